"""`cpt merge`: the formulas to float32 rounding, the files of a loadable model, a checkpoint read as
its export, one error line per bad input, and memory that stays a few tensors while a merge streams."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scripts import tiny
from transformers import AutoConfig, AutoModelForCausalLM

from cpt import cli
from cpt.errors import CptError
from cpt.merge import arithmetic
from cpt.merge.command import add_merge_parser, cmd_merge

LLAMA = tiny.ARCHS["llama"]
# name: (config changes, dtype, seed); "a" is stored in bfloat16 to show the float32 computation
MODELS = {
    "a": ({}, torch.bfloat16, 0),
    "b": ({}, torch.float32, 1),
    "c": ({}, torch.float32, 2),
    "qwen": (tiny.ARCHS["qwen2"], torch.float32, 3),
    "deep": ({"num_hidden_layers": 3}, torch.float32, 4),
    "wide": ({"intermediate_size": 96}, torch.float32, 5),
    "vocab": ({"vocab_size": tiny.VOCAB + 8}, torch.float32, 6),
}

# What `cpt` does with a merge once wired into cpt.cli (the same parser class and error printing).
CHILD = """
import sys
import cpt.merge.stream  # torch and the merge's modules, loaded before the baseline
from cpt import cli
from cpt.merge.command import add_merge_parser, cmd_merge

def rss(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024

parser = cli._Parser(prog="cpt")
add_merge_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(["merge", *sys.argv[1:]])
before = rss("VmRSS:")
cmd_merge(args)
print(rss("VmHWM:") - before)
"""


def merge(*argv) -> int:
    """`cpt merge ARGV` in this process, with cpt.cli's parser class and error handling."""
    parser = cli._Parser(prog="cpt")
    add_merge_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return cmd_merge(parser.parse_args(["merge", *map(str, argv)]))
    except CptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models saved by transformers with safetensors, each with the same trained tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny.train_tokenizer(root / "tokenizer")
    dirs = {}
    for name, (changes, dtype, seed) in MODELS.items():
        torch.manual_seed(seed)
        config = AutoConfig.for_model(**{**LLAMA, **changes})
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        with torch.no_grad():  # norms start at 1 in every model: make them differ too
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        dirs[name] = root / name
        model.save_pretrained(dirs[name], safe_serialization=True)
        tokenizer.save_pretrained(dirs[name])
    # b's weights and config with a tokenizer that maps two tokens the other way round
    dirs["retokenized"] = root / "retokenized"
    shutil.copytree(dirs["b"], dirs["retokenized"])
    path = dirs["retokenized"] / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(data))
    return dirs


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, sharded or not."""
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_rounded(out: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """``out`` is ``exact`` (a formula computed in float32 by the test) stored as ``dtype``, to float32
    rounding: within half a unit of ``dtype``'s last place, and mostly equal to its rounding."""
    assert out.keys() == exact.keys()
    for name, value in out.items():
        assert value.dtype == dtype, name
        torch.testing.assert_close(value.float(), exact[name], rtol=torch.finfo(dtype).eps / 2 + 1e-6, atol=1e-7)
        if dtype != torch.float32:  # computed in bfloat16, most elements would differ from this rounding
            assert (value != exact[name].to(dtype)).float().mean() < 1e-3, name


def test_average_linear_and_residual_equal_their_formulas_in_float32(models, tmp_path):
    a, b, c = (weights(models[n]) for n in "abc")
    a32 = {k: v.float() for k, v in a.items()}

    assert merge("average", models["a"], models["b"], models["c"], "--weights", "1,2,1", "--out", tmp_path / "avg") == 0
    assert_rounded(weights(tmp_path / "avg"), {k: 0.25 * a32[k] + 0.5 * b[k] + 0.25 * c[k] for k in a}, torch.bfloat16)

    assert merge("linear", models["a"], models["c"], "--alpha", "0.3", "--out", tmp_path / "lin") == 0
    assert_rounded(weights(tmp_path / "lin"), {k: 0.7 * a32[k] + 0.3 * c[k] for k in a}, torch.bfloat16)

    assert merge("residual", "--base", models["a"], "--instruct", models["c"], "--onto", models["b"],
                 "--out", tmp_path / "res") == 0
    assert_rounded(weights(tmp_path / "res"), {k: b[k] + (c[k] - a32[k]) for k in a}, torch.float32)

    assert merge("average", models["b"], models["c"], "--out", tmp_path / "uniform") == 0
    assert_rounded(weights(tmp_path / "uniform"), {k: (b[k] + c[k]) / 2 for k in b}, torch.float32)


def test_slerp_of_a_model_with_itself_is_itself_and_ends_at_its_inputs(models, tmp_path):
    a, b, c = (weights(models[n]) for n in "abc")
    for out, (first, second, alpha), expected in [
        ("self", ("a", "a", "0.3"), a), ("start", ("b", "c", "0"), b), ("end", ("b", "c", "1"), c),
    ]:
        assert merge("slerp", models[first], models[second], "--alpha", alpha, "--out", tmp_path / out) == 0
        got = weights(tmp_path / out)
        assert got.keys() == expected.keys()
        assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in got), out


def test_the_result_is_a_model_directory_that_loads_with_the_first_inputs_files(models, tmp_path):
    out = tmp_path / "sharded"
    assert merge("slerp", models["b"], models["c"], "--alpha", "0", "--out", out, "--max-shard-gb", "0.00004") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (models["b"] / name).read_bytes(), name
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(models["b"]).eval()(ids).logits
    assert torch.equal(merged, original)


def test_slerp_is_exact_where_it_must_be_and_linear_where_the_angle_says_nothing():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.equal(arithmetic.slerp(a, a, alpha), a)
    assert torch.equal(arithmetic.slerp(a, b, 0.0), a) and torch.equal(arithmetic.slerp(a, b, 1.0), b)
    # orthogonal unit vectors: halfway is on the unit circle, at 45 degrees from both
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(arithmetic.slerp(x, y, 0.5), torch.tensor([1.0, 1.0]) / 2**0.5)
    for other in (torch.zeros(1000), -2 * a, 3 * a):  # zero, anti-parallel, parallel
        torch.testing.assert_close(arithmetic.slerp(a, other, 0.25), torch.lerp(a, other, 0.25))
    torch.testing.assert_close(arithmetic.residual(a, b, 2 * b), a + b)
    torch.testing.assert_close(arithmetic.weighted_sum(iter([(0.25, a), (0.75, b)])), 0.25 * a + 0.75 * b)


def test_a_checkpoint_merges_as_its_export(tmp_path, monkeypatch):
    """A real ZeRO-0 checkpoint (bf16, tied embeddings) reads as exactly the tensors `cpt export` writes."""
    from cpt.config.training import DistributedConfig, OptimizerConfig
    from cpt.merge import inputs
    from cpt.train.checkpoint import save
    from cpt.train.engine import build_engine
    from cpt.train.export import export_checkpoint
    from cpt.train.model import build_model, resize_for_tokenizer

    tokenizer = tiny.train_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model(tiny.model_spec("qwen2"))
    resize_for_tokenizer(model, tokenizer)
    trainer = build_engine(model, DistributedConfig(zero_stage=0, precision="bf16"), OptimizerConfig(), lambda t: 1e-2,
                           micro_batch_size=2, grad_accum=1)
    trainer.train_step([tiny.blocks(tokenizer, 2)], 0)
    checkpoint = save(trainer, tmp_path / "checkpoints", 1, {}, tokenizer=tokenizer)
    export_checkpoint(checkpoint, tmp_path / "export")

    monkeypatch.setattr(inputs, "_REMAP_BYTES", 1)  # the map is opened again for every tensor
    assert merge("linear", checkpoint, tmp_path / "export", "--alpha", "0.5", "--out", tmp_path / "merged") == 0
    merged, exported = weights(tmp_path / "merged"), weights(tmp_path / "export")
    assert merged.keys() == exported.keys()  # the tied output embedding is stored once, as in the export
    assert all(merged[k].dtype == exported[k].dtype == torch.bfloat16 and torch.equal(merged[k], exported[k])
               for k in merged)
    assert (tmp_path / "merged" / "config.json").read_bytes() == (checkpoint / "hf" / "config.json").read_bytes()


def _no_weights(root: Path, models: dict[str, Path]) -> None:
    (root / "bare").mkdir()
    (root / "bare" / "config.json").write_text(json.dumps(LLAMA))


def _zero3(root: Path, models: dict[str, Path]) -> None:
    (root / "z3" / "hf").mkdir(parents=True)
    (root / "z3" / "cpt_checkpoint.json").write_text(json.dumps({"format": 1, "tag": "global_step1", "zero_stage": 3}))


def _full_out(root: Path, models: dict[str, Path]) -> None:
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")


def _long_context(root: Path, models: dict[str, Path]) -> None:
    """b after a long-context stage: the same tensors under another RoPE base."""
    shutil.copytree(models["b"], root / "long")
    config = json.loads((root / "long" / "config.json").read_text())
    rope = dict(config.get("rope_parameters") or {}) | {"rope_theta": 500000.0}
    (root / "long" / "config.json").write_text(json.dumps(config | {"rope_parameters": rope}))


def _truncated(root: Path, models: dict[str, Path]) -> None:
    """b with its weights file cut short: found at its last tensor, while the output is being written."""
    shutil.copytree(models["b"], root / "cut")
    with open(root / "cut" / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 4)


ERRORS = {
    "missing dir": ("linear {a} {root}/nope --alpha 0.5", "nope: no such directory", None),
    "no weights": ("linear {a} {root}/bare --alpha 0.5", "bare: no safetensors weights", _no_weights),
    "architectures": ("linear {a} {qwen} --alpha 0.5", "different architectures: ", None),
    "tensor names": ("average {a} {deep}", "different tensors: ", None),
    "shapes": ("slerp {a} {wide} --alpha 0.5", "model.layers.0.mlp.down_proj.weight has shape [32, 64] in ", None),
    "config vocab": ("linear {a} {vocab} --alpha 0.5", "different vocabularies: vocab_size 320 in ", None),
    "tokenizer vocab": ("average {b} {retokenized}", "different vocabularies: the tokenizers differ", None),
    "truncated input": ("linear {a} {root}/cut --alpha 0.5", "cut/model.safetensors ends inside a tensor", _truncated),
    "alpha": ("linear {a} {b} --alpha 1.5", "--alpha must be in [0, 1], got 1.5", None),
    "weights count": ("average {a} {b} --weights 1", "--weights has 1 numbers for 2 models", None),
    "negative weight": ("average {a} {b} --weights 1,-1", "--weights must be finite and >= 0", None),
    "zero weights": ("average {a} {b} --weights 0,0", "--weights sum to 0", None),
    "one input": ("average {a}", "average needs at least two models", None),
    "zero-3 checkpoint": ("linear {root}/z3 {a} --alpha 0.5", "run `cpt export ", _zero3),
    "full output": ("linear {a} {b} --alpha 0.5", "already exists and is not empty; pass --overwrite", _full_out),
    "output is an input": ("linear {a} {b} --alpha 0.5 --overwrite --out {a}", "would replace the input", None),
    "output inside an input": ("linear {a} {b} --alpha 0.5 --overwrite --out {a}/sub", "would replace the input", None),
    "rope base": ("linear {a} {root}/long --alpha 0.5", "different rope_parameters: ", _long_context),
}


@pytest.mark.parametrize("case", ERRORS)
def test_a_bad_input_is_one_error_line_and_writes_nothing(models, tmp_path, capsys, case):
    template, message, prepare = ERRORS[case]
    if prepare:
        prepare(tmp_path, models)
    before = sorted(tmp_path.rglob("*"))
    argv = template.format(root=tmp_path, **models).split()
    code = merge(*argv, *([] if "--out" in argv else ["--out", tmp_path / "out"]))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before and sorted(models["a"].parent.glob(".tmp-*")) == []


def _llama_shapes(vocab: int, hidden: int, intermediate: int, layers: int):
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for proj in ("q", "k", "v", "o"):
            yield f"{prefix}self_attn.{proj}_proj.weight", (hidden, hidden)
        yield f"{prefix}mlp.gate_proj.weight", (intermediate, hidden)
        yield f"{prefix}mlp.up_proj.weight", (intermediate, hidden)
        yield f"{prefix}mlp.down_proj.weight", (hidden, intermediate)
        yield f"{prefix}input_layernorm.weight", (hidden,)
        yield f"{prefix}post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def test_a_merge_streams_in_a_few_tensors_of_memory(tmp_path):
    """Two llama models of 115M float32 parameters (458 MB each): the merge's peak resident memory
    grows by three copies of the largest tensor (a 65 MB embedding), not by whole models."""
    shapes = dict(_llama_shapes(vocab=32000, hidden=512, intermediate=1536, layers=24))
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        (tmp_path / f"m{seed}").mkdir()
        save_file({name: torch.empty(shape).normal_(generator=g) for name, shape in shapes.items()},
                  tmp_path / f"m{seed}" / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / f"m{seed}" / "config.json").write_text(json.dumps(
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000}))
    size = (tmp_path / "m0" / "model.safetensors").stat().st_size
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, "linear", tmp_path / "m0", tmp_path / "m1", "--alpha", "0.3", "--out",
             tmp_path / "out"], capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        growth, largest = int(proc.stdout.split()[-1]), 32000 * 512 * 4
        # an input's copy, the other's, the result: 0.43 of one model here, where loading both takes 2
        assert growth < 3.5 * largest < 0.6 * size, f"peak resident memory grew by {growth / 1e6:.0f} MB"
        name = "model.layers.23.mlp.down_proj.weight"
        with safe_open(tmp_path / "m0" / "model.safetensors", "pt") as f0, \
                safe_open(tmp_path / "m1" / "model.safetensors", "pt") as f1, \
                safe_open(tmp_path / "out" / "model.safetensors", "pt") as out:
            torch.testing.assert_close(out.get_tensor(name), 0.7 * f0.get_tensor(name) + 0.3 * f1.get_tensor(name))
    finally:
        shutil.rmtree(tmp_path)  # 1.4 GB that pytest would otherwise keep with its last runs

"""Vocabulary extension: new tokens learned on code, appended to a tokenizer trained on prose; the
model's embeddings grow with mean-initialised rows and compute the same logits on old tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from cpt.cli import main
from cpt.config.data import DomainConfig
from cpt.config.load import load_recipe
from cpt.data.extension import compression, extend_tokenizer, learn_merges, read_extension
from cpt.data.sources import iter_documents
from cpt.data.tokenizer import load_tokenizer
from cpt.errors import CptError
from cpt.plan import plan_recipe
from cpt.train.vocabulary import grow_embeddings
from tests.scripts.tiny import ARCHS, VOCAB, train_tokenizer

ADD = 32
CODE = DomainConfig(source="builtin:python-stdlib", heldout=2, max_documents=12)


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """(base tokenizer, extended tokenizer, extension, code documents): 32 tokens learned on code."""
    root = tmp_path_factory.mktemp("vocabulary")
    base = train_tokenizer(root / "base")
    code = list(iter_documents(CODE, "train", 0))
    extend_tokenizer(base, learn_merges(base, code, ADD, min_frequency=2), root / "extended")
    return base, load_tokenizer(str(root / "extended")), read_extension(base, root / "extended", "mean"), code


def test_old_ids_keep_their_text_and_new_ids_come_after(extended):
    base, ext, extension, code = extended
    assert len(base) == VOCAB and len(ext) == VOCAB + ADD
    assert extension.ids == list(range(VOCAB, VOCAB + ADD))
    whole = 0
    for i in range(VOCAB):
        text, symbols = base.decode([i]), base.convert_ids_to_tokens(i)
        assert ext.decode([i]) == text and ext.convert_ids_to_tokens(i) == symbols
        if i not in base.all_special_ids:  # BPE of each old token's string: still that token
            assert [t.id for t in ext.backend_tokenizer.model.tokenize(symbols)] == [i]
        if base.encode(text, add_special_tokens=False) == [i]:  # not the bytes of a partial UTF-8 character
            whole += 1
            assert ext.encode(text, add_special_tokens=False) == [i]
    assert whole > VOCAB // 2
    for new, pieces in zip(extension.ids, extension.pieces):
        assert len(pieces) > 1 and all(p < VOCAB for p in pieces)
        assert base.decode(pieces) == ext.decode([new])  # a new token is the text of its base pieces
    ids = ext.encode(code[0], add_special_tokens=False)
    assert ext.decode(ids) == code[0] and max(ids) >= VOCAB  # new tokens are used, and text round-trips
    assert compression(base, ext, code)["gain"] > 1.1  # prose merges leave code's indentation in pieces


def test_learning_is_deterministic_and_refuses_what_the_text_cannot_give(extended):
    base, _, _, code = extended
    assert learn_merges(base, code, 8, 2) == learn_merges(base, code, ADD, 2)[:8]
    with pytest.raises(CptError, match="give only 1 of the 2 new tokens"):  # "qz" twice, then " qz" once
        learn_merges(base, ["qz qz"], 2, 2)


def _model(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in ARCHS["llama"].items() if k != "model_type"}, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_grown_model_keeps_old_logits_and_starts_new_rows_at_their_pieces_mean(extended, tied):
    base_tok, _, extension, code = extended
    base = _model(tied)
    grown = _model(tied)
    grow_embeddings(grown, extension)
    assert grown.get_input_embeddings().num_embeddings == VOCAB + ADD == grown.config.vocab_size
    tables = [(base.get_input_embeddings().weight, grown.get_input_embeddings().weight)]
    if not tied:
        tables.append((base.get_output_embeddings().weight, grown.get_output_embeddings().weight))
    else:
        assert grown.get_output_embeddings().weight is grown.get_input_embeddings().weight
    for old, new in tables:
        assert torch.equal(new[:VOCAB], old)
        for token, pieces in zip(extension.ids, extension.pieces):
            assert torch.equal(new[token], old[pieces].mean(0))
    ids = torch.tensor([base_tok.encode(code[0], add_special_tokens=False)[:48]])  # text of old tokens only
    with torch.no_grad():
        assert torch.equal(grown(ids).logits[..., :VOCAB], base(ids).logits)


def test_random_init_draws_from_the_model_initializer_range(extended):
    _, _, extension, _ = extended
    base, grown = _model(False), _model(False)
    grow_embeddings(grown, replace(extension, init="random"))
    for old, new in ((base.get_input_embeddings().weight, grown.get_input_embeddings().weight),
                     (base.get_output_embeddings().weight, grown.get_output_embeddings().weight)):
        assert torch.equal(new[:VOCAB], old)
        assert new[VOCAB:].std().item() == pytest.approx(grown.config.initializer_range, rel=0.2)


RECIPE = """
name: vocab
seed: 0
output_dir: {out}
distributed: {{zero_stage: {zero}, num_processes: 1, precision: fp32}}
stages:
  - name: prose
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64,
               tie_word_embeddings: false}}
    tokenizer: {{train: {{vocab_size: 320, max_documents: 20}}}}
    data:
      prose: {{source: "builtin:python-docs", heldout: 2, max_documents: 20}}
    schedule: {{type: constant, lr: 1.0e-2, warmup: 0}}
    steps: 2
    seq_len: 32
    batch: {{global_batch_size: 2, micro_batch_size: 2}}
    evaluation: {{enabled: false}}
  - name: code
    tokenizer: {{extend: {{from: [{source}], add: 16, max_documents: 6}}}}
    data:
      code: {{source: "builtin:python-stdlib", heldout: 2, max_documents: 8}}
    schedule: {{type: constant, lr: 1.0e-9, warmup: 0}}
    steps: 2
    seq_len: 32
    batch: {{global_batch_size: 2, micro_batch_size: 2}}
    evaluation: {{enabled: false}}
"""


def _recipe(tmp_path: Path, source: str = "code", zero: int = 0) -> Path:
    path = tmp_path / "vocab.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run", source=source, zero=zero))
    return path


def test_a_domain_the_stage_does_not_know_is_one_error_line(tmp_path, capsys):
    code = main(["validate", str(_recipe(tmp_path, source="kode"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "stages.code.tokenizer.extend.from: unknown domain 'kode'; known domains: code, prose" in err[0]


def test_run_grows_the_model_under_zero3_and_plan_reports_the_gain(tmp_path, capsys):
    """A stage that extends the previous stage's tokenizer continues its model (no vocabulary
    mismatch), with 16 new rows that start at their pieces' mean (lr 1e-9 keeps them there)."""
    recipe = _recipe(tmp_path, zero=3)
    assert main(["plan", str(recipe), "--json"]) == 0
    stages = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    vocabulary = stages["code"]["vocabulary"]
    assert "vocabulary" not in stages["prose"]
    assert (vocabulary["base_size"], vocabulary["added"], vocabulary["size"]) == (320, 16, 336)
    assert vocabulary["compression"]["code"]["gain"] > 1
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "run" / "code" / "final"
    assert len(load_tokenizer(str(final))) == 336
    weights = load_file(final / "model.safetensors")
    extension = plan_recipe(load_recipe(recipe))[1].extension  # cached: the tokens the run learned
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        table = weights[name]
        assert table.shape[0] == 336
        means = torch.stack([table[pieces].mean(0) for pieces in extension.pieces])
        torch.testing.assert_close(table[extension.ids], means, atol=1e-7, rtol=0)

"""lm-evaluation-harness tasks: offline next-line tasks, scoring with an in-memory model, task names."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from cpt.config.data import DomainConfig
from cpt.config.evaluation import HarnessConfig
from cpt.config.tokenizer import TrainTokenizerConfig
from cpt.data.sources import iter_documents
from cpt.data.tokenizer import train_tokenizer
from cpt.errors import CptError
from cpt.eval.lm_adapter import harness_lm, loglikelihoods
from cpt.eval.nextline import build_nextline_task, is_answer_line, nextline_examples
from cpt.eval.tasks import HarnessTasks, plain_metrics, resolve_tasks, run_harness

CPU = torch.device("cpu")
CODE = DomainConfig(source="builtin:python-stdlib", heldout=6)
WORDS = "the a model learns reads writes token data domain stage replay mixture loss step rate warm decay".split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of paragraphs whose every line is unique to its document (it names it)."""
    rng = random.Random(seed)
    docs = []
    for k in range(n):
        paragraphs = []
        for p in range(rng.randint(2, 4)):
            lines = [
                f"doc{k} p{p} l{j} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))
                for j in range(rng.randint(3, 6))
            ]
            paragraphs.append("\n".join(lines))
        docs.append("\n\n".join(paragraphs))
    return docs


@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> DomainConfig:
    path = tmp_path_factory.mktemp("prose") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in synthetic_docs(40)))
    return DomainConfig(source=str(path), heldout=10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        TrainTokenizerConfig(vocab_size=400), synthetic_docs(60, seed=1), tmp_path_factory.mktemp("tok") / "tok"
    )


def tiny_llama(vocab_size: int, max_positions: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def direct_logprob(model, ids: list[int], n_scored: int) -> float:
    """log p of the last ``n_scored`` tokens of ``ids`` given the ones before, one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, -1)[-n_scored:]
    return logprobs.gather(-1, torch.tensor(ids[-n_scored:])[:, None]).sum().item()


# --- building next-line examples ---


def test_nextline_examples_are_deterministic_and_well_formed():
    docs = list(iter_documents(CODE, "heldout", seed=0))
    doc_lines = [[line.rstrip() for line in doc.splitlines()] for doc in docs]
    examples = nextline_examples(docs, 60, seed=0)
    assert examples == nextline_examples(docs, 60, seed=0)
    assert examples != nextline_examples(docs, 60, seed=1)
    assert len(examples) == 60 and len({e["label"] for e in examples}) == 4
    for e in examples:
        answer = e["choices"][e["label"]]
        distractors = [c for i, c in enumerate(e["choices"]) if i != e["label"]]
        assert is_answer_line(answer) and all(is_answer_line(d) for d in distractors)
        assert len({c.strip() for c in e["choices"]}) == 4  # the answer is never among the distractors
        assert 2 <= len(e["context"].splitlines()) <= 8 and len(e["context"]) <= 400
        own = [lines for lines in doc_lines if f"{e['context']}\n{answer}\n" in "\n".join(lines) + "\n"]
        assert own, "the context and its answer are consecutive lines of a held-out document"
        own_lines = {line.strip() for lines in own for line in lines}
        for d in distractors:
            assert d.strip() not in own_lines
            assert any(d in lines for lines in doc_lines if lines not in own)
    # spread over the documents: the first examples come from many of them
    sources = {next(i for i, d in enumerate(docs) if e["context"] in d) for e in examples[: len(docs)]}
    assert len(sources) >= len(docs) // 2


def test_distractors_are_close_in_length():
    examples = nextline_examples(iter_documents(CODE, "heldout", seed=0), 200, seed=0)
    gaps = []
    for e in examples:
        answer = len(e["choices"][e["label"]].strip())
        gaps += [abs(len(c.strip()) - answer) / answer for i, c in enumerate(e["choices"]) if i != e["label"]]
    assert sorted(gaps)[len(gaps) // 2] < 0.1  # the median distractor is within 10% of the answer's length


def test_nextline_task_reads_only_heldout_documents(prose: DomainConfig, tmp_path: Path):
    task_yaml = build_nextline_task("prose", prose, seed=3, cache_dir=tmp_path, n_examples=50)
    examples = [json.loads(line) for line in (task_yaml.parent / "test.jsonl").read_text().splitlines()]
    assert 20 <= len(examples) <= 50
    train = list(iter_documents(prose, "train", seed=3))
    heldout = list(iter_documents(prose, "heldout", seed=3))
    for e in examples:
        for line in e["context"].splitlines() + e["choices"]:
            assert not any(line in doc for doc in train)
            assert any(line in doc for doc in heldout)
    config = yaml.safe_load(task_yaml.read_text())
    assert config["task"] == "cpt_nextline_prose" and config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(task_yaml.parent / "test.jsonl")

    # cached by documents, seed and size; built atomically, nothing else left in the cache
    assert build_nextline_task("prose", prose, seed=3, cache_dir=tmp_path, n_examples=50) == task_yaml
    other = build_nextline_task("prose", prose, seed=4, cache_dir=tmp_path, n_examples=50)
    assert other.parent != task_yaml.parent
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([task_yaml.parent.name, other.parent.name])


def test_a_domain_with_one_heldout_document_cannot_make_a_task(prose: DomainConfig, tmp_path: Path, caplog):
    one = prose.model_copy(update={"heldout": 1})
    with pytest.raises(CptError, match="cannot build cpt_nextline_prose") as err:
        build_nextline_task("prose", one, seed=0, cache_dir=tmp_path, n_examples=10)
    assert err.value.where == "data.prose"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CptError, match="cannot build cpt_nextline_prose"):  # named: the task is required
        resolve_tasks(["cpt_nextline_prose"], {"prose": one}, 0, tmp_path, 10)
    # the family name takes every domain that can make a task, and says which could not
    tasks = resolve_tasks(["cpt_nextline"], {"prose": one, "more": prose}, 0, tmp_path, 10)
    assert tasks.names == ("cpt_nextline_more",)
    assert "data.prose: cannot build cpt_nextline_prose" in caplog.text


# --- scoring ---


def test_loglikelihood_equals_a_direct_computation(tokenizer):
    from lm_eval.api.instance import Instance

    model = tiny_llama(len(tokenizer)).train()
    lm = harness_lm(model, tokenizer, batch_size=2, device=CPU, max_length=16)
    pairs = [
        ("doc3 p1 l0 the model", " learns data"),
        ("replay mixture", " loss"),
        ("a", " step rate warm decay the token"),
        ("doc9 p0 l2 warm decay replay mixture loss step rate the a model learns reads writes", " token data"),
        ("", "domain stage"),
        ("the loss  ", "decay"),  # trailing spaces move to the continuation
    ]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    assert model.training  # the mode is restored
    model.eval()
    prefix = tokenizer.eos_token_id  # this tokenizer's BOS is its EOS
    lengths = []
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        scored = encode(tokenizer, continuation)
        ids = [prefix, *encode(tokenizer, context), *scored]
        lengths.append(len(ids))
        window = ids[-17:]  # max_length 16: 16 inputs predict 16 tokens
        assert logprob == pytest.approx(direct_logprob(model, window, len(scored)), abs=1e-5)
        assert isinstance(greedy, bool)
    assert max(lengths) > 17  # a pair was truncated from the left

    text = "doc1 p0 l1 the model reads data"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [prefix, *encode(tokenizer, text)]
    assert rolling == pytest.approx(direct_logprob(model, ids, len(ids) - 1), abs=1e-5)

    long = " ".join(WORDS)
    tokens = encode(tokenizer, long)
    n = len(tokens)
    assert 16 < n <= 32  # two windows: the first 16 tokens, then the rest with as much context as fits
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)])
    expected = direct_logprob(model, [prefix, *tokens[:16]], 16) + direct_logprob(model, tokens[n - 17 :], n - 16)
    assert rolling == pytest.approx(expected, abs=1e-5)


def test_greedy_flag_follows_the_argmax(tokenizer):
    model = tiny_llama(len(tokenizer))
    context = [tokenizer.eos_token_id, *encode(tokenizer, "the model")]
    with torch.no_grad():
        best = int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())
    worst = (best + 1) % len(tokenizer)
    scores = loglikelihoods(model, [(context, [best]), (context, [worst])], batch_size=4, max_length=64, device=CPU)
    assert scores[0][1] and not scores[1][1] and scores[0][0] > scores[1][0]


# --- running tasks ---


def test_offline_nextline_tasks_run_end_to_end(prose: DomainConfig, tokenizer, tmp_path: Path):
    domains = {"prose": prose, "code": CODE, "unmeasured": prose.model_copy(update={"heldout": 0})}
    tasks = resolve_tasks(["cpt_nextline", "cpt_nextline_code"], domains, seed=0, cache_dir=tmp_path, n_examples=40)
    assert tasks.names == ("cpt_nextline_prose", "cpt_nextline_code") and not tasks.registry
    model = tiny_llama(len(tokenizer)).train()
    python_state = random.getstate()
    results = run_harness(model, tokenizer, tasks, device=CPU, limit=12, batch_size=8)
    assert set(results) == {"cpt_nextline_prose", "cpt_nextline_code"}
    for metrics in results.values():
        assert set(metrics) == {"acc", "acc_norm"}
        assert all(0 <= v <= 1 and v * 12 == pytest.approx(round(v * 12)) for v in metrics.values())
    assert model.training and random.getstate() == python_state
    assert run_harness(model, tokenizer, HarnessTasks(), device=CPU, limit=12, batch_size=8) == {}


def test_a_local_task_yaml_scores_like_a_direct_argmax(tokenizer, tmp_path: Path):
    rng = random.Random(0)
    docs = []
    for _ in range(10):
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(3)]
        docs.append({"question": " ".join(rng.choices(WORDS, k=6)), "options": choices, "gold": rng.randrange(3)})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "qa.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "my_qa",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tmp_path / "qa.jsonl")}},
                "output_type": "multiple_choice",
                "test_split": "test",
                "doc_to_text": "question",
                "doc_to_choice": "options",
                "doc_to_target": "gold",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    tasks = resolve_tasks([str(tmp_path / "qa.yaml")], {}, seed=0, cache_dir=tmp_path / "cache", n_examples=10)
    assert tasks.names == ("my_qa",) and tasks.specs == (str(tmp_path / "qa.yaml"),)
    model = tiny_llama(len(tokenizer), seed=1)
    results = run_harness(model, tokenizer, tasks, device=CPU, limit=None, batch_size=4)

    prefix = tokenizer.eos_token_id
    right = 0
    for d in docs:
        context = [prefix, *encode(tokenizer, d["question"])]
        scores = []
        for choice in d["options"]:
            continuation = encode(tokenizer, " " + choice)
            scores.append(direct_logprob(model, context + continuation, len(continuation)))
        right += max(range(3), key=scores.__getitem__) == d["gold"]
    assert results == {"my_qa": {"acc": right / len(docs)}}


def test_bad_task_names_fail_before_training(prose: DomainConfig, tmp_path: Path):
    domains = {"prose": prose}
    with pytest.raises(CptError, match=r"unknown harness task 'cpt_nextline_code'.*known: cpt_nextline_prose") as err:
        resolve_tasks(["cpt_nextline_code"], domains, 0, tmp_path, 10)
    assert err.value.where == "evaluation.harness.tasks"
    with pytest.raises(CptError, match="needs held-out documents"):
        resolve_tasks(["cpt_nextline_prose"], {"prose": prose.model_copy(update={"heldout": 0})}, 0, tmp_path, 10)
    with pytest.raises(CptError, match="missing.yaml does not exist"):
        resolve_tasks([str(tmp_path / "missing.yaml")], domains, 0, tmp_path, 10)
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(CptError, match="cannot read harness task file"):
        resolve_tasks([str(tmp_path / "broken.yaml")], domains, 0, tmp_path, 10)
    (tmp_path / "nameless.yml").write_text("dataset_path: json\n")
    with pytest.raises(CptError, match="names no task"):
        resolve_tasks([str(tmp_path / "nameless.yml")], domains, 0, tmp_path, 10)
    (tmp_path / "gen.yaml").write_text("task: my_gen\noutput_type: generate_until\n")
    with pytest.raises(CptError, match="'my_gen' generates text"):
        resolve_tasks([str(tmp_path / "gen.yaml")], domains, 0, tmp_path, 10)


@pytest.mark.slow
def test_registry_names_are_checked_against_lm_eval():
    """Reads lm-eval's whole task index (~14k YAML files): the slowest test of this file."""
    assert resolve_tasks(["arc_easy"], {}, 0, Path("unused"), 10) == HarnessTasks(("arc_easy",), ("arc_easy",), True)
    with pytest.raises(CptError, match=r"unknown harness task 'arc_eazy'.*registry; did you mean arc_easy"):
        resolve_tasks(["arc_eazy"], {}, 0, Path("unused"), 10)
    with pytest.raises(CptError, match="'gsm8k' generates text"):
        resolve_tasks(["gsm8k"], {}, 0, Path("unused"), 10)


# --- small pieces ---


def test_plain_metric_names():
    values = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1, "sample_len": 3}
    assert plain_metrics(values) == {"acc": 0.5, "exact_match,strict-match": 1.0}


def test_harness_config():
    assert HarnessConfig().model_dump() == {
        "tasks": ["cpt_nextline"],
        "every": None,
        "limit": 100,
        "batch_size": 16,
        "num_fewshot": 0,
    }
    for bad in ({"every": 0}, {"limit": 0}, {"batch_size": 0}, {"num_fewshot": -1}, {"task": ["x"]}):
        with pytest.raises(ValidationError):
            HarnessConfig(**bad)

"""Offline harness tasks: multiple-choice next-line prediction on a domain's held-out documents.

``cpt_nextline_<domain>`` shows a few consecutive lines of a held-out document and asks which of
four lines comes next: the true one, or one of three lines taken from *other* held-out documents
of the same domain, picked close to the true line in length so that length alone does not tell.
Only held-out documents are read, so no example overlaps the training data, and no hub is needed:
the examples are written as JSON lines beside an lm-evaluation-harness task YAML.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path

import yaml

from cpt.config.data import DomainConfig
from cpt.config.evaluation import NEXTLINE, nextline_task
from cpt.data.sources import fingerprint, iter_documents
from cpt.errors import CptError
from cpt.io import staged_entry

FORMAT_VERSION = 1  # bump whenever the examples or the task YAML change
CHOICES = 4
MAX_CONTEXT_CHARS = 400
MAX_CONTEXT_LINES = 8
MIN_CONTEXT_LINES = 2
MIN_LINE_CHARS = 10  # shorter lines (")", "else:", "pass") say too little to be an answer
MAX_LINE_CHARS = 200
LENGTH_NEIGHBOURS = 32  # distractors are drawn from this many pool lines either side of the answer's length
MAX_DOCUMENTS = 1000  # held-out documents read at most (more when more examples are asked for)


def is_answer_line(line: str) -> bool:
    """Long enough to carry meaning, and mostly words or code rather than rules like ``-----``."""
    text = line.strip()
    if not MIN_LINE_CHARS <= len(text) <= MAX_LINE_CHARS:
        return False
    return 2 * sum(char.isalnum() for char in text) >= len(text)


def _context_start(lines: Sequence[str], i: int) -> int:
    """First line of the longest run of non-blank lines right before line ``i`` that fits the bounds."""
    start, chars = i, 0
    while start > 0 and i - start < MAX_CONTEXT_LINES and lines[start - 1].strip():
        chars += len(lines[start - 1]) + 1
        if chars > MAX_CONTEXT_CHARS:
            break
        start -= 1
    return start


def nextline_examples(documents: Iterable[str], n: int, seed: int) -> list[dict]:
    """Up to ``n`` examples ``{"context", "choices", "label"}``; the same documents and seed give the same list.

    Examples are dealt round-robin over the documents in a seeded order, so the first examples
    (those a ``limit`` keeps) are spread over many documents; examples of one document never
    share lines.
    """
    rng = random.Random(f"{NEXTLINE}\0{seed}")
    docs = [[line.rstrip() for line in doc.splitlines()] for doc in documents]
    own_lines = [{line.strip() for line in lines} for lines in docs]
    pool = sorted({(len(line.strip()), line) for lines in docs for line in lines if is_answer_line(line)})
    spans: list[list[tuple[int, int]]] = []
    for lines in docs:
        found = []
        for i, line in enumerate(lines):
            if is_answer_line(line) and i - (start := _context_start(lines, i)) >= MIN_CONTEXT_LINES:
                found.append((start, i))
        rng.shuffle(found)
        spans.append(found)
    order = list(range(len(docs)))
    rng.shuffle(order)

    examples: list[dict] = []
    used: list[set[int]] = [set() for _ in docs]
    for turn in range(max((len(s) for s in spans), default=0)):
        for d in order:
            if len(examples) == n:
                return examples
            if turn >= len(spans[d]):
                continue
            start, i = spans[d][turn]
            if used[d].intersection(range(start, i + 1)):
                continue
            distractors = _distractors(pool, docs[d][i], own_lines[d], rng)
            if distractors is None:
                continue
            used[d].update(range(start, i + 1))
            label = rng.randrange(CHOICES)
            choices = distractors[:label] + [docs[d][i]] + distractors[label:]
            examples.append({"context": "\n".join(docs[d][start:i]), "choices": choices, "label": label})
    return examples


def _distractors(
    pool: list[tuple[int, str]], answer: str, answer_doc: set[str], rng: random.Random
) -> list[str] | None:
    """Three different lines of other documents, none found anywhere in the answer's document,
    near the answer in length; None when the pool has too few such lines."""
    at = bisect.bisect_left(pool, (len(answer.strip()),))
    for window in (pool[max(0, at - LENGTH_NEIGHBOURS) : at + LENGTH_NEIGHBOURS], pool):
        seen: dict[str, str] = {}
        for _, line in window:
            if line.strip() not in answer_doc:
                seen.setdefault(line.strip(), line)
        if len(seen) >= CHOICES - 1:
            return rng.sample(list(seen.values()), CHOICES - 1)
    return None


def build_nextline_task(domain: str, cfg: DomainConfig, seed: int, cache_dir: Path, n_examples: int) -> Path:
    """The task YAML of ``cpt_nextline_<domain>``, built once per (documents, seed, size, format).

    The directory is written under a temporary name and renamed into place, so a reader (or a
    second rank building the same task at the same time) never sees a half-written task.
    """
    name = nextline_task(domain)
    key = f"{name}-{fingerprint(cfg, seed)}-seed{seed}-n{n_examples}-v{FORMAT_VERSION}"
    final = Path(cache_dir).expanduser().resolve() / key
    task_yaml = final / f"{name}.yaml"
    if task_yaml.is_file():
        return task_yaml
    documents = islice(iter_documents(cfg, "heldout", seed), max(MAX_DOCUMENTS, n_examples))
    examples = nextline_examples(documents, n_examples, seed)
    if not examples:
        raise CptError(
            f"cannot build {name}: the held-out documents of {cfg.source} give no next-line example "
            f"(it needs at least two held-out documents with runs of {MIN_CONTEXT_LINES}+ lines); "
            "raise heldout or drop the task",
            where=f"data.{domain}",
        )
    with staged_entry(final, lambda entry: (entry / task_yaml.name).is_file()) as staging:
        with open(staging / "test.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
        (staging / task_yaml.name).write_text(yaml.safe_dump(_task_config(name, final / "test.jsonl"), sort_keys=False))
    return task_yaml


def _task_config(name: str, data: Path) -> dict:
    """An lm-evaluation-harness task reading the examples with the ``json`` builder (no hub needed).

    The continuation starts with a newline, so a choice is scored exactly as the next line of
    the context; few-shot examples come from the same file (the harness never shows an example
    as its own shot).
    """
    metrics = [{"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")]
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "fewshot_split": "test",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "\n",
        "fewshot_delimiter": "\n\n",
        "metric_list": metrics,
        "metadata": {"version": FORMAT_VERSION},
    }

"""MeCo: documents carry their metadata while conditioning, not in the cooldown, and it is never a target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from cpt.config.load import load_recipe
from cpt.data.blocks import IGNORE_INDEX
from cpt.data.sampler import MixtureSampler
from cpt.plan import plan_recipe
from cpt.train.run import gather

STEPS = 10

RECIPE = {
    "name": "meco-test",
    "seed": 0,
    "stages": [{
        "name": "meco",
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 64}},
        "tokenizer": {"train": {"vocab_size": 512, "max_documents": 60}},
        "data": {
            "prose": {"source": "PROSE", "heldout": 4, "metadata": {"field": "topic", "template": "Topic: {value}\n\n"}},
            "plain": {"source": "builtin:python-stdlib", "heldout": 4, "max_documents": 20},
        },
        "mixture": {"weights": {"prose": 1, "plain": 1}, "phases": [{"until": 0.8}, {"until": 1.0, "metadata": False}]},
        "document_masking": True,
        "schedule": {"type": "constant", "lr": 1e-3},
        "steps": STEPS,
        "seq_len": 32,
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
    }],
}


def short_documents(path):
    """Documents of a few dozen tokens, so that blocks hold several, whatever this Python's corpora are."""
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    rows = [{"text": " ".join(words[i * 9 : i * 9 + 5 + i % 13]), "topic": f"topic-{i % 7}"} for i in range(300)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("meco") / "meco.yaml"
    recipe = json.loads(json.dumps(RECIPE))
    recipe["stages"][0]["data"]["prose"]["source"] = short_documents(path.parent / "prose.jsonl")
    path.write_text(yaml.safe_dump(recipe))
    (stage_plan,) = plan_recipe(load_recipe(path))
    return stage_plan


def steps_of(plan):
    sampler = MixtureSampler(plan.weights, [len(plan.blocks[d]) for d in plan.domains], 8, 0, "meco")
    for step in range(STEPS):
        rows = sampler.next_step()
        yield step, rows, gather(plan, step, rows)


def prose_rows(plan, rows, step):
    """(row in the batch, packed split, block) of every prose row of a step."""
    mine = np.flatnonzero(rows[:, 0] == plan.domains.index("prose"))
    packed, blocks = plan.read(step, "prose", rows[mine, 1])
    return [(row, packed, int(block)) for row, block in zip(mine, blocks)]


def starts_in(packed, block: int) -> list[int]:
    first = block * packed.seq_len
    return [int(s) - first for s in packed.doc_starts if first <= s < first + packed.seq_len]


def test_conditioning_blocks_hold_the_metadata_and_cooldown_blocks_do_not(plan):
    tokenizer = plan.tokenizer
    assert plan.metadata.tolist() == [True] * 8 + [False] * 2
    assert plan.conditioned() == ["prose"] and plan.blocks["prose"].loss_mask is not None
    prefixes, starts_seen = "", 0
    for step, rows, batch in steps_of(plan):
        for row, packed, block in prose_rows(plan, rows, step):
            if step >= 8:  # cooldown: the plain text, no metadata anywhere
                assert packed.loss_mask is None and "Topic:" not in tokenizer.decode(batch.ids[row])
                continue
            mask = np.asarray(packed.loss_mask[block])
            prefixes += tokenizer.decode(batch.ids[row][torch_mask(mask == 0)])
            for start in starts_in(packed, block):  # every document in the block opens with its metadata
                end = start + int(np.argmax(np.append(mask[start:], 1) == 1))
                assert end > start
                if end < len(mask):  # the whole prefix lies in this block
                    prefix = tokenizer.decode(batch.ids[row, start:end])
                    assert prefix.startswith("Topic: ") and prefix.endswith("\n\n"), prefix
                    starts_seen += 1
    assert starts_seen > 0 and prefixes.count("Topic: ") >= starts_seen


def torch_mask(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def test_metadata_tokens_are_never_targets(plan):
    masked = 0
    for step, rows, batch in steps_of(plan):
        for row, packed, block in prose_rows(plan, rows, step):
            if packed.loss_mask is None:
                continue
            mask = np.asarray(packed.loss_mask[block])
            # position t predicts token t + 1: never a metadata token (mask 0)
            assert (batch.targets[row, :-1][torch_mask(mask[1:] == 0)] == IGNORE_INDEX).all()
            masked += int((mask[1:] == 0).sum())
    assert masked > 0


def test_the_cooldown_reads_the_plain_variant_at_the_same_place(plan):
    tagged, plain = plan.blocks["prose"], plan.alternate["prose"]
    assert len(plain) < len(tagged)
    draws = np.arange(len(tagged))
    packed, blocks = plan.read(STEPS - 1, "prose", draws)
    assert packed is plain and blocks.min() == 0 and blocks.max() == len(plain) - 1
    assert (np.diff(blocks) >= 0).all()
    assert plan.read(0, "prose", draws)[0] is tagged

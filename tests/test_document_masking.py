"""Document masking: a packed block scores exactly as its documents would, each on its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt.config.data import DomainConfig
from cpt.data.blocks import IGNORE_INDEX, TokenBatch, read_rows
from cpt.data.pack import load_packed
from cpt.errors import CptError
from cpt.train.head import ChunkedHead, causal_lm_loss
from cpt.train.model import set_attention

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import tiny  # noqa: E402

SEQ = 48


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def packed(tok, tmp_path_factory):
    """Short documents of varied length, so that most blocks hold several of them."""
    words = tiny.corpus().split()
    rows = [{"text": " ".join(words[i * 7 : i * 7 + 3 + (i * 5) % 17])} for i in range(120)]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_packed(DomainConfig(source=str(path), heldout=0), "train", tok, SEQ, 0, path.parent / "cache")


def attention_backends() -> list[str]:
    found = ["sdpa", "eager"]
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        found.append("flex_attention")
    except ImportError:
        pass
    return found


def tiny_model(arch: str, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        model = tiny_model_unchecked(arch, attention)
    except CptError as exc:  # e.g. GPT-2 has no flex_attention: refused in one line, as a recipe would be
        assert exc.message.startswith(f"cannot use attention '{attention}'")
        pytest.skip(exc.message)
    return model.eval()


def segments(packed, row: int) -> list[np.ndarray]:
    """The block's pieces between document starts, each a document (or the part of one) on its own."""
    ids = np.asarray(packed.tokens[row], dtype=np.int64)
    first = row * SEQ
    inside = [int(s) - first for s in packed.doc_starts if first < s < first + SEQ]
    return np.split(ids, inside)


@pytest.mark.parametrize("attention", attention_backends())
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_block_scores_as_its_documents_alone(packed, arch: str, attention: str):
    model = tiny_model(arch, attention)
    rows = np.array([r for r in range(len(packed)) if len(segments(packed, r)) >= 3][:3])
    assert len(rows) == 3
    batch = TokenBatch(*(torch.from_numpy(a) for a in read_rows(packed, rows, document_masking=True)))
    with torch.no_grad():
        block_loss, per_token = causal_lm_loss(model, ChunkedHead.of(model), batch, batch.n_targets())
        total, count = 0.0, 0
        for row in rows:
            for piece in segments(packed, row):
                if len(piece) < 2:
                    continue
                ids = torch.from_numpy(piece)[None]
                alone = model(input_ids=ids).logits[0, :-1].double()
                total += torch.nn.functional.cross_entropy(alone, ids[0, 1:], reduction="sum").item()
                count += len(piece) - 1
    assert batch.n_targets() == count
    assert block_loss.item() == pytest.approx(total / count, abs=1e-5)
    # without document masking the tokens after a boundary see the document before it: other losses
    plain = TokenBatch(*(torch.from_numpy(a) if a is not None else None for a in read_rows(packed, rows, False)))
    with torch.no_grad():
        _, crossing = causal_lm_loss(model, ChunkedHead.of(model), plain, plain.n_targets())
    later = (batch.positions > 0) & (batch.targets != IGNORE_INDEX) & (torch.arange(SEQ) > batch.positions)
    assert later.sum() > 10
    assert (crossing[later] - per_token[later]).abs().max() > 1e-4


def test_positions_restart_and_boundary_targets_are_ignored(packed):
    rows = np.arange(len(packed))
    ids, targets, positions = read_rows(packed, rows, document_masking=True)
    flat_starts = set(packed.doc_starts.tolist())
    for r in rows[:20]:
        for t in range(SEQ):
            offset = r * SEQ + t
            if t == 0 or offset in flat_starts:
                assert positions[r, t] == 0
            else:
                assert positions[r, t] == positions[r, t - 1] + 1
            last = t == SEQ - 1 or offset + 1 in flat_starts
            assert (targets[r, t] == IGNORE_INDEX) == last
            if not last:
                assert targets[r, t] == ids[r, t + 1]


def test_an_attention_backend_that_is_not_installed_is_one_error_line():
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(CptError, match="cannot use attention 'flash_attention_2' with LlamaForCausalLM") as err:
        tiny_model_unchecked("llama", "flash_attention_2")
    assert err.value.where == "test" and "\n" not in err.value.message


def tiny_model_unchecked(arch: str, attention: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny.ARCHS[arch]))
    set_attention(model, attention, "test")
    return model


def test_one_row_of_blocks_end_to_end_scores_as_the_batch(packed, monkeypatch: pytest.MonkeyPatch):
    """flash_attention_2 sees packed documents in a batch of one row only: the rows run end to end."""
    import cpt.train.head as head_module

    model = tiny_model("llama", "sdpa")
    batch = TokenBatch(*(torch.from_numpy(a) for a in read_rows(packed, np.arange(4), document_masking=True)))
    with torch.no_grad():
        loss, per_token = causal_lm_loss(model, ChunkedHead.of(model), batch, batch.n_targets())
        monkeypatch.setattr(head_module, "_varlen_only_in_one_row", lambda model: True)
        row_loss, row_per_token = causal_lm_loss(model, ChunkedHead.of(model), batch, batch.n_targets())
    assert row_per_token.shape == per_token.shape
    assert torch.allclose(row_per_token, per_token, atol=1e-5) and row_loss.item() == pytest.approx(loss.item(), abs=1e-6)


def test_a_model_that_changes_its_head_output_falls_back_to_full_logits(packed):
    model = tiny_model("llama", "sdpa")

    def doubled(module, args, output):  # as a logit multiplier that transformers' config does not name
        output.logits = output.logits * 2
        return output

    model.register_forward_hook(doubled)
    batch = TokenBatch(*(torch.from_numpy(a) for a in read_rows(packed, np.arange(2), document_masking=True)))
    with torch.no_grad():
        loss, _ = causal_lm_loss(model, ChunkedHead.of(model), batch, batch.n_targets())
        logits = model(input_ids=batch.ids, position_ids=batch.positions, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert ChunkedHead.of(model) is None  # from now on the model's own logits

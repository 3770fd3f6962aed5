"""Held-out loss: the exact token-weighted mean, computed without gradients, model mode restored;
the lockstep sharding of forward passes over ranks that it shares with the harness."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt.config.data import DomainConfig
from cpt.config.tokenizer import TrainTokenizerConfig
from cpt.data.pack import Packed
from cpt.data.sources import iter_documents
from cpt.data.tokenizer import train_tokenizer
from cpt.eval.heldout import heldout_losses, heldout_sets, perplexity
from cpt.eval.lockstep import lockstep_sums


def _model(vocab=97):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def packed(blocks: np.ndarray, document: int) -> Packed:
    """Blocks whose documents are ``document`` tokens long."""
    return Packed(tokens=blocks, doc_starts=np.arange(0, blocks.size, document, dtype=np.uint64),
                  loss_mask=None, entry=Path("."))


def test_with_document_masking_each_document_is_scored_alone():
    model = _model().eval()
    blocks = np.random.default_rng(1).integers(0, 97, size=(5, 16))
    got = heldout_losses(model, {"a": packed(blocks, 4)}, batch_size=2, device=torch.device("cpu"),
                         document_masking=True)["a"]
    pieces = torch.from_numpy(blocks).reshape(-1, 4)  # every 4-token document on its own
    with torch.no_grad():
        logits = model(input_ids=pieces).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), pieces[:, 1:].reshape(-1)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    plain = heldout_losses(model, {"a": packed(blocks, 4)}, batch_size=2, device=torch.device("cpu"))["a"]
    assert abs(plain - got) > 1e-4


def test_loss_is_the_mean_over_every_predicted_token():
    model = _model()
    rng = np.random.default_rng(0)
    sets = {"a": rng.integers(0, 97, size=(7, 16)), "b": rng.integers(0, 97, size=(3, 16))}
    model.train()
    got = heldout_losses(model, {k: packed(v, 16) for k, v in sets.items()}, batch_size=3,
                         device=torch.device("cpu"))
    assert model.training  # restored
    for name, blocks in sets.items():
        ids = torch.from_numpy(blocks)
        with torch.no_grad():
            model.eval()
            logits = model(input_ids=ids).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).item()
        assert got[name] == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_heldout_sets_are_capped_leading_blocks_of_the_heldout_split(tmp_path):
    prose = DomainConfig(source="builtin:python-docs", heldout=20, max_documents=200)
    none = DomainConfig(source="builtin:python-docs", heldout=0, max_documents=50)
    tok = train_tokenizer(TrainTokenizerConfig(vocab_size=400, max_documents=50),
                          iter_documents(prose, "train", 0), tmp_path / "tok")
    full = heldout_sets({"prose": prose}, tok, 32, 0, tmp_path / "cache", max_tokens=10**9)["prose"]
    capped = heldout_sets({"prose": prose, "none": none}, tok, 32, 0, tmp_path / "cache", max_tokens=32 * 5)
    assert list(capped) == ["prose"]  # no held-out split, nothing to measure
    assert len(full) > 5 and np.array_equal(capped["prose"].tokens, full.tokens[:5])


def test_perplexity_saturates():
    assert perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf


def test_lockstep_deals_batches_and_keeps_every_rank_in_step():
    """Without a process group nothing is reduced, so each simulated rank returns its own part."""
    model = torch.nn.Linear(1, 1).train()
    batches = list(range(7))

    def rank_part(rank: int, world_size: int) -> tuple[list[int], torch.Tensor]:
        calls = []

        def score(batch: int, totals: torch.Tensor) -> None:
            assert not model.training and not torch.is_grad_enabled()
            calls.append(batch)
            totals[batch] += batch + 1

        return calls, lockstep_sums(model, batches, score, (7,), torch.device("cpu"), rank, world_size)

    parts = [rank_part(rank, 3) for rank in range(3)]
    assert [calls for calls, _ in parts] == [[0, 3, 6], [1, 4, 0], [2, 5, 0]]  # short ranks repeat batch 0
    assert sum(totals for _, totals in parts).tolist() == rank_part(0, 1)[1].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert model.training  # restored
    assert lockstep_sums(model, [], None, (2,), torch.device("cpu"), 1, 2).tolist() == [0, 0]

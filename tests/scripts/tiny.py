"""Tiny real models and a real tokenizer for the trainer tests, built offline in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320

# Two layers, hidden 32: real architectures, small enough to train on a CPU in milliseconds.
ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),  # dropout 0.1: needs the RNG
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, vocab_size=VOCAB),
}


def corpus(chars: int = 40_000) -> str:
    """English prose that every Python installation carries."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB):
    """cpt's own byte-level BPE, trained on :func:`corpus`, saved to ``out_dir`` and returned."""
    from cpt.config.tokenizer import TrainTokenizerConfig
    from cpt.data.tokenizer import train_tokenizer as train

    return train(TrainTokenizerConfig(vocab_size=vocab_size), corpus().split("\n\n"), Path(out_dir))


def model_spec(arch: str) -> dict:
    """The ``model`` field of a stage that builds ``arch`` from scratch."""
    return {"config": dict(ARCHS[arch])}


def blocks(tokenizer, n: int, seq_len: int = 32, offset: int = 0) -> torch.Tensor:
    """``n`` consecutive ``seq_len``-token blocks of the corpus, from block ``offset`` on."""
    ids = tokenizer(corpus(), return_tensors="pt").input_ids[0]
    start = offset * seq_len
    return ids[start : start + n * seq_len].view(n, seq_len).clone()


def failure(stderr: str, limit: int = 3000) -> str:
    """What to show of a failed child's stderr: the Python fault handler's report where it crashed
    (each thread's stack; the report ends in a long list of extension modules), else the end."""
    start = stderr.find("Fatal Python error")
    return stderr[start:start + limit] if start >= 0 else stderr[-limit:]

"""The model being trained as an lm-evaluation-harness ``LM``: it scores lm-eval's requests in memory.

It reports a single process to lm-eval: every rank builds the same requests, and the forward
passes are shared out over ranks by :func:`cpt.eval.lockstep.lockstep_sums`, as ZeRO-3's
collective weight gathering requires. It imports lm-eval, so :mod:`cpt.eval.tasks` imports it
only when a harness runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from cpt.config.evaluation import generation_unsupported
from cpt.errors import CptError
from cpt.eval.lockstep import lockstep_sums


def prefix_token(tokenizer) -> int:
    """The token a document starts after: BOS, or EOS for tokenizers without one (cpt packs
    documents separated by EOS, so a scored text is seen exactly as a document start)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise CptError("the tokenizer has neither a BOS nor an EOS token to start a scored text with", "tokenizer")
    return token


def loglikelihoods(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int, max_length: int,
    device: torch.device, rank: int = 0, world_size: int = 1,
) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether greedy decoding gives the continuation,
    for each (context ids, continuation ids) pair; contexts must not be empty.

    A pair longer than ``max_length + 1`` tokens loses tokens from the left (the continuation's
    too, when it alone is longer). Pairs run longest first in batches of ``batch_size``, padded on
    the right: with causal attention, padding after a token never changes its prediction.
    """
    windows = [(context + continuation)[-(max_length + 1) :] for context, continuation in pairs]
    scored = [min(len(continuation), len(w) - 1) for w, (_, continuation) in zip(windows, pairs)]
    order = sorted(range(len(pairs)), key=lambda i: -len(windows[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def score(rows: list[int], scores: torch.Tensor) -> None:  # log-likelihood, greedy (0/1) per pair
        width = len(windows[rows[0]]) - 1
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(windows[i]) - 1] = torch.tensor(windows[i][:-1])
            mask[r, : len(windows[i]) - 1] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(rows):
            end, n = len(windows[i]) - 1, scored[i]
            logprobs = torch.log_softmax(logits[r, end - n : end].float(), dim=-1)
            targets = torch.tensor(windows[i][-n:], device=logprobs.device)
            scores[i, 0] += logprobs.gather(-1, targets[:, None]).sum()
            scores[i, 1] += float((logprobs.argmax(-1) == targets).all())

    scores = lockstep_sums(model, batches, score, (len(pairs), 2), device, rank, world_size)
    return [(total, bool(greedy)) for total, greedy in scores.tolist()]


def harness_lm(model: torch.nn.Module, tokenizer, *, batch_size: int, device: torch.device,
               max_length: int | None = None, rank: int = 0, world_size: int = 1,
               document_masking: bool = False) -> ModelLM:
    """``model`` as an lm-eval ``LM``; ``max_length`` defaults to the model's position limit."""
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
        if max_length is None:
            raise CptError("the model config has no max_position_embeddings: give the harness a max_length", "model")
    return ModelLM(model, tokenizer, batch_size, max_length, device, rank, world_size, document_masking)


class ModelLM(LM):
    """Scores lm-eval requests with an in-memory model. A single process as far as lm-eval
    knows: every rank builds the same requests, and :func:`loglikelihoods` shares out the passes.

    A context starts after the document separator, as a document does in packed training; a
    model trained with document masking never saw a separator before a document (its documents
    start at position 0 on their own), so its contexts start with their first token instead.
    Rolling log-likelihoods keep the separator either way: it is what predicts a text's first token.
    """

    def __init__(self, model, tokenizer, batch_size: int, max_length: int, device: torch.device, rank: int,
                 world_size: int, document_masking: bool = False):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.shard = {"device": device, "rank": rank, "world_size": world_size}
        self.prefix = prefix_token(tokenizer)
        self.document_masking = document_masking

    def _score(self, pairs):
        return loglikelihoods(self.model, pairs, batch_size=self.batch_size, max_length=self.max_length, **self.shard)

    def _encode(self, texts: Sequence[str]) -> dict[str, list[int]]:
        unique = list(dict.fromkeys(texts))
        return dict(zip(unique, self.tokenizer(unique, add_special_tokens=False)["input_ids"]))

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        # Trailing whitespace of a context belongs to the continuation's first word.
        pairs = []
        for context, continuation in (request.args for request in requests):
            stripped = context.rstrip()
            pairs.append((stripped, context[len(stripped) :] + continuation))
        ids = self._encode([text for pair in pairs for text in pair])
        token_pairs = [(self._context(ids[c]), ids[x]) for c, x in pairs]
        return self._score(token_pairs)

    def _context(self, ids: list[int]) -> list[int]:
        return ids if self.document_masking and ids else [self.prefix, *ids]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        texts = [request.args[0] for request in requests]
        ids = self._encode(texts)
        windows = [
            [make_disjoint_window(w) for w in get_rolling_token_windows(ids[t], self.prefix, self.max_length, 1)]
            for t in texts
        ]
        flat = [w for doc in windows for w in doc]
        scores = iter(self._score(flat))
        return [sum(next(scores)[0] for _ in doc) for doc in windows]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        raise generation_unsupported(requests[0].task_name if requests else "?")

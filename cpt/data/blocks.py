"""What a training or evaluation pass reads from packed blocks: inputs, targets and positions.

Targets are the next token of each position, or ``IGNORE_INDEX`` where nothing is to be learned:
the last position of a block (its next token lies in another block), a token the loss mask
excludes (a metadata prefix), and, with document masking, the last token of a document (its next
token starts another document, which the position cannot see). Position ids restart at 0 at every
document start with document masking, which is how transformers recognises packed sequences and
keeps attention inside each document; without it they run 0..seq_len-1 as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cpt.data.pack import Packed
from cpt.train.loss import IGNORE_INDEX


@dataclass
class TokenBatch:
    """Rows of token ids with their next-token targets and (document masking) position ids."""

    ids: torch.Tensor  # (rows, seq_len) int64
    targets: torch.Tensor  # (rows, seq_len) int64, IGNORE_INDEX where no token is predicted
    positions: torch.Tensor | None = None  # (rows, seq_len) int64; None: 0..seq_len-1

    @classmethod
    def plain(cls, ids: torch.Tensor) -> TokenBatch:
        """Every next token of every row is a target, attention spans the row (packing without masks)."""
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[:, :-1] = ids[:, 1:]
        return cls(ids, targets)

    def split(self, rows: int) -> list[TokenBatch]:
        parts = [t.split(rows) if t is not None else None for t in (self.ids, self.targets, self.positions)]
        return [TokenBatch(ids, targets, parts[2][i] if parts[2] is not None else None)
                for i, (ids, targets) in enumerate(zip(parts[0], parts[1]))]

    def to(self, device: torch.device, non_blocking: bool = False) -> TokenBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking) if t is not None else None  # noqa: E731
        return TokenBatch(move(self.ids), move(self.targets), move(self.positions))

    def pin_memory(self) -> TokenBatch:
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        return TokenBatch(pin(self.ids), pin(self.targets), pin(self.positions))

    def as_one_row(self) -> TokenBatch:
        """The rows end to end as one (1, rows * seq_len) row: positions restart at every row, so its
        rows stay apart under document masking, and a row's last target is already ignored."""
        flat = [t.reshape(1, -1) if t is not None else None for t in (self.ids, self.targets, self.positions)]
        return TokenBatch(*flat)

    def n_targets(self) -> int:
        """Predicted tokens (on the host: no device synchronisation)."""
        return int((self.targets != IGNORE_INDEX).sum())


def read_rows(packed: Packed, rows: np.ndarray, document_masking: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ids, targets and (document masking) positions of blocks ``rows`` of one packed split, as int64 arrays."""
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.asarray(packed.tokens[rows], dtype=np.int64)
    targets = np.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    if packed.loss_mask is not None:
        targets[:, :-1][np.asarray(packed.loss_mask[rows])[:, 1:] == 0] = IGNORE_INDEX
    if not document_masking:
        return ids, targets, None
    starts = document_starts(packed.doc_starts, rows, packed.seq_len)
    targets[:, :-1][starts[:, 1:]] = IGNORE_INDEX
    return ids, targets, positions_from_starts(starts)


def document_starts(doc_starts: np.ndarray, rows: np.ndarray, seq_len: int) -> np.ndarray:
    """(rows, seq_len) bool: True where a document begins inside each block."""
    out = np.zeros((len(rows), seq_len), dtype=bool)
    first = rows.astype(np.uint64) * np.uint64(seq_len)
    lo = np.searchsorted(doc_starts, first)
    hi = np.searchsorted(doc_starts, first + np.uint64(seq_len))
    for i in range(len(rows)):
        out[i, (doc_starts[lo[i] : hi[i]] - first[i]).astype(np.int64)] = True
    return out


def positions_from_starts(starts: np.ndarray) -> np.ndarray:
    """Position ids that count from 0 at every document start (and at the start of each block)."""
    index = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return index - last_start

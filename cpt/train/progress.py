"""Live progress: a tqdm bar on a terminal, plain log lines otherwise (CI logs, batch jobs)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, stage: str, total: int, start: int, *, enabled: bool = True, every: int = 10):
        self.enabled = enabled
        self.total = total
        self.every = every
        self.stage = stage
        self._tty = sys.stderr.isatty()
        self._bar = None
        self._t0 = time.perf_counter()
        self._start = start
        self._tokens = 0
        self._loss = float("nan")
        if enabled and self._tty:
            self._bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True)

    def update(self, step: int, tokens: int, loss: float | None, lr: float) -> None:
        """Called after optimizer step ``step`` (0-based) that consumed ``tokens`` tokens; ``loss``
        is None on steps that did not read it (it would cost a device synchronisation)."""
        if not self.enabled:
            return
        self._tokens += tokens
        self._loss = self._loss if loss is None else loss
        loss = self._loss
        rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.3g} {rate:,.0f} tok/s", refresh=False)
            self._bar.update(1)
            return
        done = step + 1
        if done % self.every == 0 or done == self.total:
            left = (self.total - done) * (time.perf_counter() - self._t0) / max(done - self._start, 1)
            print(
                f"[{self.stage}] step {done}/{self.total} loss {loss:.4f} lr {lr:.3g} "
                f"{rate:,.0f} tok/s eta {left:,.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

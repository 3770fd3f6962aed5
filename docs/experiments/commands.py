"""The `cpt` runner the experiment scripts share: each command printed, run, timed and logged,
so that a generated page lists exactly what to type."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time


class Commands:
    """Runs `cpt` commands in the working directory (the scripts move to the repository root) and
    keeps the ones of the current section."""

    def __init__(self):
        self.log: list[str] = []

    def __call__(self, *args: str) -> str:
        command = ["cpt", *map(str, args)]
        self.log.append(shlex.join(command))
        print("$", shlex.join(command), flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, args)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"failed ({proc.returncode}): {shlex.join(command)}\n{proc.stderr[-3000:]}")
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        return proc.stdout

    def block(self) -> list[str]:
        """The section's commands as a code block, then a fresh section."""
        lines, self.log = ["Commands:", "", "```", *self.log, "```", ""], []
        return lines

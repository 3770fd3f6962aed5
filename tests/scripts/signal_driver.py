"""Run under the deepspeed launcher by tests/test_engine.py: ``signal_driver OUT_DIR``.

Each process announces itself, waits for SIGTERM, lingers as a rank saving a checkpoint would,
and records how many SIGTERMs it got.
"""

import os
import signal
import sys
import time
from pathlib import Path

out, rank = Path(sys.argv[1]), os.environ["RANK"]
received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
(out / f"ready-{rank}").write_text(os.environ["WORLD_SIZE"])
deadline = time.monotonic() + 120
while not received and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # "saving": a second signal, from the launcher say, would arrive now
(out / f"stopped-{rank}").write_text(str(len(received)))

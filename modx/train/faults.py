"""A testing hook: kill this process (SIGKILL, as `kill -9`) at a named point of a run.

    MODX_KILL_AT=step:5 accelerate launch train_modx.py ...      # killed at the 5th "step"
    MODX_KILL_AT=step:5 MODX_KILL_SIGNAL=SIGTERM ...             # sent SIGTERM there instead

Points: "step" (after an optimiser step), "checkpoint" (a state half written),
"evaluate" (phase-end evaluation, after the first eval set's results row). `NAME:N` kills
at the N-th time this process reaches NAME (default 1); `MODX_KILL_RANK` (default 0) picks
the process. Unset (always, outside tests), `fault_point` does nothing; nor does it in a
process that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0: the fault happened once).
The resume tests use it to check that a run killed anywhere resumes to the uninterrupted
run's results.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Kill this process here if MODX_KILL_AT names this point (and this is the N-th time)."""
    spec = os.environ.get("MODX_KILL_AT")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    point, _, nth = spec.partition(":")
    if point != name or os.environ.get("RANK", "0") != os.environ.get("MODX_KILL_RANK", "0"):
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, os.environ.get("MODX_KILL_SIGNAL", "SIGKILL")))

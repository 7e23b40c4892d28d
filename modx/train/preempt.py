"""Preemption: a signal (train.preempt_signals) asks the run to stop at the next step.

    with Preemption(t.preempt_signals) as preemption:
        ...
        if preemption.requested(world):   # every step, on every process (collective)
            save a state; raise Preempted(...)

A cluster may signal one process only (SLURM's `--signal`, a node being drained), so the
flags are combined across processes at each step boundary (an all-reduce MAX of one
number on a gloo group: no device sync) and every process stops at the same step. The
handler only sets a flag, however often the signal comes (a launcher may pass on the signal
that the process got already); system calls it interrupts are restarted. A process stuck in
a collective (a peer died) never reaches a step boundary: SIGKILL ends it (torchrun sends
one after its shutdown timeout). Loader workers ignore the signals (modx.data.loader), so
a signal to the whole process group leaves them running until the state is written.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch


class Preempted(Exception):
    """A preemption signal stopped the run at a step boundary; a state was saved."""


class Preemption:
    """Handlers of the preemption signals while a run lasts (the previous ones restored after)."""

    def __init__(self, signals: list[str]):
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None  # the signal this process received, if any
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals (a run in a thread is not preemptible)
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
            signal.siginterrupt(signum, False)  # a collective or a write in progress goes on
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, world: int) -> bool:
        """Whether any of the `world` processes received a signal (collective when distributed:
        every process calls it at the same points)."""
        if world == 1:
            return self.received is not None
        import torch.distributed as dist

        from modx.train.replay import _object_group

        flag = torch.tensor([0.0 if self.received is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_object_group())
        return bool(flag.item())

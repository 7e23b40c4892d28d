"""The training loop's side of replay (modx.data.replay): what each loader segment
replays, the buffer the trained samples go to, and its place in checkpoints.

    feed = ReplayFeed(cfg, phases, rank, world)          # every process, same config
    plan = feed.plan(phase, global_step)                 # per loader segment
    feed.trained(batch, plan, phase.index, global_step)  # per micro-batch, after it is read
    feed.step_done(global_step, skip)                    # per optimiser step (skip: 0-d tensor)
    feed.settle()                                        # at log lines and checkpoints

Nothing here waits for the device per step: skipped steps are read when the loop reads its
other counters, and their samples leave the buffer before any later segment can replay them.

A state saved inside a segment (a preemption: modx.train.data) also keeps the segment's
buffer snapshot (`save(..., within=True)`: the ids in order, and the samples the buffer
has dropped since in replay-segment.tar) and the skip flags not read yet (`position`), so
the resumed run replays from the same snapshot and drops the same samples when it reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modx.config import Config, ConfigError
from modx.data.replay import (
    STATE_JSON,
    STATE_TAR,
    Entry,
    ReplayBuffer,
    ReplayPlan,
    read_entries,
    replay_counts,
    schedule_weights,
    write_entries,
)
from modx.data.seeds import stable_seed
from modx.strategies import replay_ratio
from modx.train.data import Phase

SEGMENT_TAR, SEGMENT_JSON = "replay-segment.tar", "replay-segment.json"  # the snapshot of a state inside a segment


class ReplayFeed:
    def __init__(self, cfg: Config, phases: list[Phase], rank: int, world: int, kl_on_replay: bool = False):
        from modx.data.urls import DataError, parse_sources

        r, t = cfg.strategy.replay, cfg.train
        self.ratio = replay_ratio(cfg.strategy)
        self.source = r.source
        self.schedule = r.schedule
        self.global_batch = t.batch_size
        self.grad_accum = t.grad_accum
        self.rank, self.world = rank, world
        self.phases = phases
        self.seed = stable_seed(t.seed, "replay")  # the same on every process: global decisions
        self.views = cfg.strategy.teacher_cache  # digest the replayed views (Mod-X's teacher cache)
        self.data: tuple[str, ...] = ()
        if r.data:
            try:
                self.data = tuple(u for s in parse_sources(r.data) for u in s.urls)
            except DataError as err:
                raise ConfigError("strategy.replay.data", str(err)) from None
        self.buffer = ReplayBuffer(r.size, int(r.max_mb * 2**20), self.seed) if r.source == "buffer" else None
        self.pending: list[tuple[int, torch.Tensor]] = []  # (global step, skip flag) not read yet
        self.snapshot: tuple[Entry, ...] = ()  # what the current segment replays (source buffer)
        self.exchange = _all_gather_objects if world > 1 else None
        if self.exchange is not None:
            _object_group()  # collective: every process creates the group now
        self._check(kl_on_replay)

    def _check(self, kl_on_replay: bool) -> None:
        """Refuse batches that cannot hold the replay share (one line naming the key)."""
        counts = replay_counts(self.global_batch, self.ratio, self.world)
        b = self.global_batch // self.world
        if sum(counts) == 0:
            raise ConfigError("strategy.replay.ratio", f"{self.ratio} of a global batch of {self.global_batch} "
                              "replays no sample: raise train.batch_size or the ratio (or set it to 0)")
        if max(counts) >= b:
            raise ConfigError("strategy.replay.ratio", f"{self.ratio} of a global batch of {self.global_batch} "
                              f"leaves a process of {self.world} no fresh sample: lower the ratio")
        if kl_on_replay and sum(counts) < 2:
            raise ConfigError("strategy.replay.ratio", f"Mod-X's KL over the replayed samples needs at least 2 "
                              f"of them, but {self.ratio} of {self.global_batch} is {sum(counts)}: raise "
                              "train.batch_size or the ratio, or set strategy.kl_on=batch")

    # ---- per segment

    def plan(self, phase: Phase, global_step: int, within: bool = False) -> ReplayPlan:
        """What the loader segment starting at `global_step` of `phase` replays; `within`:
        the segment a resumed state was saved inside (its snapshot as that state kept it)."""
        common = dict(first_batch=global_step * self.grad_accum, seed=self.seed, phase=phase.index,
                      keep_raw=self.buffer is not None, views=self.views)
        if self.buffer is not None:
            if not within:
                self.snapshot = self.buffer.earlier(phase.index)
            entries = self.snapshot
            counts = replay_counts(self.global_batch, self.ratio, self.world, available=len(entries))
            return ReplayPlan(counts=tuple(counts), entries=entries, **common)
        sources = self.sources(phase.index)
        counts = replay_counts(self.global_batch, self.ratio, self.world, available=None if sources else 0)
        weights = schedule_weights(self.schedule, [_size(urls) for urls in sources])
        return ReplayPlan(counts=tuple(counts), sources=tuple(sources), weights=tuple(weights), **common)

    def sources(self, phase: int) -> list[tuple[str, ...]]:
        """The stream's replay sources during `phase`, oldest first: replay.data, then the
        training shards of every earlier phase (each phase one source)."""
        from modx.data.urls import parse_sources

        earlier = [tuple(u for s in parse_sources(p.train, missing_ok=True) for u in s.urls)
                   for p in self.phases[:phase]]
        return ([self.data] if self.data else []) + earlier

    # ---- per micro-batch and optimiser step

    def trained(self, batch: dict[str, Any], plan: ReplayPlan, phase: int, global_step: int) -> None:
        """The fresh samples of `batch` are trained on now: offer them to the buffer."""
        if self.buffer is None:
            return
        b = self.global_batch // self.world
        fresh = [b - c for c in plan.counts]
        self.buffer.add(batch["raw"], fresh, self.rank, phase, global_step, self.exchange)

    def step_done(self, global_step: int, skip: torch.Tensor) -> None:
        if self.buffer is not None:
            self.pending.append((global_step, skip))

    def settle(self) -> None:
        """Read the skip flags of the steps since the last call (one host sync) and drop
        the samples of skipped steps from the buffer: they were not trained on."""
        if not self.pending:
            return
        flags = torch.stack([s for _, s in self.pending]).tolist()
        skipped = {step for (step, _), flag in zip(self.pending, flags) if flag}
        self.pending = []
        if skipped:
            self.buffer.forget_steps(skipped)

    # ---- checkpoints and cost

    def save(self, directory: Path, within: bool = False) -> None:
        """Write the buffer into a checkpoint directory (the main process only: every
        process holds the same buffer); `within` a segment, its snapshot too."""
        if self.buffer is None:
            return
        self.buffer.save(directory)
        if within:
            kept = {e.id for e in self.buffer.slots if e is not None}
            gone = [(i, e) for i, e in enumerate(self.snapshot) if e.id not in kept]
            write_entries(directory / SEGMENT_TAR, gone)
            (directory / SEGMENT_JSON).write_text(json.dumps({"ids": [e.id for e in self.snapshot]}))

    def load(self, directory: Path) -> bool:
        """Restore the buffer of a checkpoint (every process reads the same files, whatever
        the number of processes that wrote it), and the segment snapshot of a state saved
        inside a segment; False when the checkpoint has no buffer."""
        if self.buffer is None or not (directory / STATE_JSON).is_file():
            return False
        self.buffer.load(directory)
        if (directory / SEGMENT_JSON).is_file():
            ids = json.loads((directory / SEGMENT_JSON).read_text())["ids"]
            by_id = {e.id: e for _, e in read_entries(directory / STATE_TAR)}  # whatever the capacity now
            by_id.update((e.id, e) for _, e in read_entries(directory / SEGMENT_TAR))
            self.snapshot = tuple(by_id[i] for i in ids)
        return True

    def position(self) -> dict[str, list]:
        """The skip flags not read yet, as [global step, flag] pairs (one host sync): a
        state saved inside a segment keeps them instead of settling (the uninterrupted
        run settles at its next log line, which the resumed run reaches too)."""
        if not self.pending:
            return {}
        flags = torch.stack([s for _, s in self.pending]).tolist()
        return {"replay_pending": [[step, flag] for (step, _), flag in zip(self.pending, flags)]}

    def restore(self, position: dict[str, list], device: torch.device) -> None:
        """Undo `position`: the flags go back to the pending ones."""
        self.pending = [(int(step), torch.tensor(float(flag), device=device))
                        for step, flag in position.get("replay_pending", [])]

    def cost(self) -> dict[str, float]:
        if self.buffer is None:
            return {}
        return {"replay_seconds": self.buffer.seconds, "replay_mb": self.buffer.peak_bytes / 2**20}


def _size(urls: tuple[str, ...]) -> float:
    """Samples in the shards (sizes.json), else their number (schedule `all`)."""
    from modx.data.urls import shard_sizes

    sizes = shard_sizes(urls)
    return float(sum(sizes)) if sizes is not None else float(len(urls))


_GROUP: list = []


def _object_group() -> Any:
    """A gloo process group for exchanging Python objects (None: the default group is
    gloo already); under NCCL, objects would otherwise travel through the GPU."""
    import torch.distributed as dist

    if not _GROUP:
        _GROUP.append(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _GROUP[0]


def _all_gather_objects(items: list) -> list[list]:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, items, group=_object_group())
    return out


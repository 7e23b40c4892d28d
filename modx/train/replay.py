"""The training loop's side of replay (modx.data.replay): what each loader segment
replays, the buffer the trained samples go to, and its place in checkpoints.

    feed = ReplayFeed(cfg, phases, rank, world)          # every process, same config
    plan = feed.plan(phase, global_step)                 # per loader segment
    feed.trained(batch, plan, phase.index, global_step)  # per micro-batch, after it is read
    feed.step_done(global_step, skip)                    # per optimiser step (skip: 0-d tensor)
    feed.settle()                                        # at log lines and checkpoints

Nothing here waits for the device per step: skipped steps are read when the loop reads its
other counters, and their samples leave the buffer before any later segment can replay them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modx.config import Config, ConfigError
from modx.data.replay import STATE_JSON, ReplayBuffer, ReplayPlan, replay_counts, schedule_weights
from modx.data.seeds import stable_seed
from modx.strategies import replay_ratio
from modx.train.data import Phase


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

    def plan(self, phase: Phase, global_step: int) -> ReplayPlan:
        """What the loader segment starting at `global_step` of `phase` replays."""
        common = dict(first_batch=global_step * self.grad_accum, seed=self.seed, phase=phase.index,
                      keep_raw=self.buffer is not None, views=self.views)
        if self.buffer is not None:
            entries = self.buffer.earlier(phase.index)
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

    def save(self, directory: Path) -> None:
        """Write the buffer into a checkpoint directory (the main process only: every
        process holds the same buffer)."""
        if self.buffer is not None:
            self.buffer.save(directory)

    def load(self, directory: Path) -> bool:
        """Restore the buffer of a checkpoint (every process reads the same files, whatever
        the number of processes that wrote it); False when the checkpoint has none."""
        if self.buffer is None or not (directory / STATE_JSON).is_file():
            return False
        self.buffer.load(directory)
        return True

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


"""The stream as the loop sees it: resolved phases and per-process training batches.

The WebDataset loader is never given to Accelerate (DESIGN.md pitfalls): each process
builds its own with modx.data.make_loader(rank=..., world_size=...), seeded per process.

Resume. The data stream is cut into *segments*: a segment starts at a phase start or at
a periodic checkpoint (every train.ckpt_every steps), and its loader is seeded by
(train.seed, global step, rank). An uninterrupted run rebuilds its loader after every
periodic checkpoint too, so a run resumed from one streams exactly the batches the
uninterrupted run streamed after it (same weights at the end): reseeding with the step
replaces the stream position. A state saved off that schedule (a preemption, the
train.max_bad_steps stop) starts no segment: it records where in the current segment it
was (its start and the batches read since), and the resumed run rebuilds that segment and
reads past those batches without training on them (`TimedBatches.skip`: at most
ckpt_every - 1 steps' batches decoded, per process).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from modx.config import Config, ConfigError
from modx.models.text import trim_padding


@dataclass
class Phase:
    """One phase of the stream with its URLs resolved and its budget in optimiser steps."""

    index: int
    name: str
    train: str
    eval: str
    steps: int
    lr: float
    val: str = ""  # validation URLs ("": none)


def resolve_phases(cfg: Config) -> list[Phase]:
    """Build missing built-in datasets, check that every URL matches shards, count steps.

    Call it on the main process first (accelerator.main_process_first()): building is
    idempotent, so the other processes then only read the URLs.
    """
    from modx.data.urls import DataError, parse_sources

    t = cfg.train
    global_batch = t.batch_size * t.grad_accum  # samples per optimiser step
    phases = []
    for i, p in enumerate(cfg.stream.phases):
        urls = {"train": p.train, "val": p.val, "eval": p.eval}
        if p.builtin is not None:
            built = _builtin_urls(p.builtin, p.classes, cfg.stream.data_root, i)
            urls = {key: value or built[key] for key, value in urls.items()}
        shards = {}
        for key, value in urls.items():
            try:
                shards[key] = {u for src in parse_sources(value) for u in src.urls} if value or key != "val" else set()
            except DataError as err:
                raise ConfigError(f"stream.phases.{i}.{key}", str(err)) from None
        for other in ("train", "eval"):
            shared = sorted(shards["val"] & shards[other])
            if shared:
                raise ConfigError(f"stream.phases.{i}.val", f"shard {shared[0]} is in {other} too: a validation "
                                  f"set must be disjoint from the {other} set")
        steps = p.steps if p.steps is not None else math.ceil(p.samples / global_batch)
        phases.append(Phase(i, p.name, urls["train"], urls["eval"], steps, p.lr or t.lr, urls["val"]))
    return phases


def resolve_eval_sets(cfg: Config) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, directory) of every zero-shot set and (name, URLs) of every held-out retrieval
    set of `cfg.eval`, built-in ones built when missing; a ConfigError names a bad entry.
    Call it on the main process first, like resolve_phases."""
    from modx.data.benchmark import ensure_builtin_zeroshot, read_benchmark
    from modx.data.builtin import BUILTINS, ZEROSHOT, ensure_builtin
    from modx.data.urls import DataError, parse_sources

    root = cfg.stream.data_root
    zeroshot, held_out = [], []
    for i, z in enumerate(cfg.eval.zeroshot):
        key = f"eval.zeroshot.{i}"
        if z.builtin is not None and z.builtin not in ZEROSHOT:
            raise ConfigError(f"{key}.builtin", f"no zero-shot set for {z.builtin!r}; choose one of {sorted(ZEROSHOT)}")
        try:
            directory = ensure_builtin_zeroshot(z.builtin, root, z.classes) if z.builtin is not None else z.data
        except ValueError as err:  # a class the dataset does not have
            raise ConfigError(f"{key}.classes", str(err)) from None
        try:
            bench = read_benchmark(directory)
        except DataError as err:
            raise ConfigError(f"{key}.data", str(err)) from None
        if bench.kind != "classification":
            raise ConfigError(f"{key}.data", f"{directory} is a {bench.kind} set, not a classification set")
        zeroshot.append((z.name, directory))
    for i, r in enumerate(cfg.eval.retrieval):
        key = f"eval.retrieval.{i}"
        urls = r.data
        if r.builtin is not None:
            if r.builtin not in BUILTINS:
                raise ConfigError(f"{key}.builtin", f"unknown built-in dataset {r.builtin!r}; choose one of {sorted(BUILTINS)}")
            urls = ensure_builtin(r.builtin, root=root)[1]
        try:
            parse_sources(urls)
        except DataError as err:
            raise ConfigError(f"{key}.data", str(err)) from None
        held_out.append((r.name, urls))
    return zeroshot, held_out


def _builtin_urls(builtin: str | list[str], classes: list[str] | None, root: str, i: int) -> dict[str, str]:
    """The train / val / eval URLs of built-in dataset(s) `builtin` (built when missing): of a
    list, the training sources mixed in equal shares (`A@1::B@1`) and the eval and val
    sets joined; with `classes`, the dataset's subset of those classes."""
    from modx.data.builtin import BUILTINS, ensure_builtin_splits

    names = builtin if isinstance(builtin, list) else [builtin]
    for name in names:
        if name not in BUILTINS:
            raise ConfigError(f"stream.phases.{i}.builtin", f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTINS)}")
    try:
        splits = [ensure_builtin_splits(name, root=root, classes=classes) for name in names]
    except ValueError as err:  # a class the dataset does not have
        raise ConfigError(f"stream.phases.{i}.classes", str(err)) from None
    if len(splits) == 1:
        return {"train": splits[0].train, "val": splits[0].val or "", "eval": splits[0].test}
    return {"train": "::".join(f"{s.train}@1" for s in splits),
            "val": "::".join(s.val for s in splits if s.val), "eval": "::".join(s.test for s in splits)}


def joint_phase(phases: list[Phase]) -> list[Phase]:
    """The `joint` upper bound: one phase over every phase's training data, summed budget."""
    train = "::".join(p.train for p in phases)
    steps = sum(p.steps for p in phases)
    return [Phase(0, "joint", train, phases[-1].eval, steps, phases[0].lr)]


def data_seed(seed: int, global_step: int, rank: int) -> int:
    """Seed of the segment of the stream that starts at `global_step` on process `rank`
    (a hash of the three: no two (seed, step, rank) share a stream)."""
    from modx.data.seeds import stable_seed

    return stable_seed(seed, global_step, rank, "train-segment")


def train_loader(cfg: Config, phase: Phase, preprocess: Callable, tokenizer: Callable, *,
                 phase_step: int, global_step: int, rank: int, world_size: int, replay: Any = None) -> Any:
    """This process's training loader for the rest of `phase` from `phase_step` (the
    segment starting at `global_step`); one epoch covers it, EWC's Fisher batches included.
    `replay`: the segment's modx.data.replay.ReplayPlan (replayed samples in every batch)."""
    from modx.data import make_loader

    batches = (phase.steps - phase_step) * cfg.train.grad_accum + cfg.strategy.ewc_batches

    return make_loader(
        phase.train,
        mode="train",
        batch_size=cfg.train.batch_size // world_size,
        preprocess=preprocess,
        tokenizer=tokenizer,
        workers=cfg.train.workers,
        seed=data_seed(cfg.train.seed, global_step, rank),
        rank=rank,
        world_size=world_size,
        resampled=True,
        shuffle=cfg.train.shuffle,
        budget_steps=batches,
        missing_ok=True,  # checked at the start; shards that vanish since are counted, skipped
        replay=replay,
    )


class TimedBatches:
    """Endless batches from a loader moved to `device`, timing the wait for data.
    `trim`: cut each text batch to its longest caption first, on the CPU
    (modx.models.text: only for text towers where that is exact)."""

    def __init__(self, loader: Any, device: torch.device, trim: bool = False):
        self.loader = loader
        self.device = device
        self.trim = trim
        self.iterator: Iterator[dict[str, Any]] = iter(loader)
        self.epoch = 0
        self.wait = 0.0  # seconds spent waiting for batches since the last `take_wait`

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        batch = self._read()
        self.wait += time.perf_counter() - start
        if self.trim:
            batch = {**batch, "text": trim_padding(batch["text"])}
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _read(self) -> dict[str, Any]:
        try:
            return next(self.iterator)
        except StopIteration:  # the epoch is over: go on with the next one
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            batch = next(self.iterator, None)
            if batch is None:
                from modx.data.urls import DataError

                raise DataError(f"no training batch could be read: are the shards missing or unreadable? "
                                f"(loader counts: {self.stats()})") from None
            return batch

    def skip(self, n: int) -> None:
        """Read `n` batches and drop them (fast-forward inside a segment): each is decoded
        as when trained on, never moved to the device. The training process's RNGs are
        left as they were (a DataLoader draws its base seed from torch's when it starts)."""
        from modx.data.seeds import preserved_rng

        with preserved_rng():
            for _ in range(n):
                self._read()

    def take_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait

    def stats(self) -> dict[str, Any]:
        """The loader's skip counts: {"samples": N, "skipped": N, "reasons": {...}}."""
        return self.loader.stats.as_dict()

    def close(self) -> None:
        self.loader.close()

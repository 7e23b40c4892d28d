"""make_loader: a per-rank streaming loader over WebDataset shards.

Each rank builds its own loader (never hand it to ``accelerator.prepare``). Inside every
DataLoader worker the pipeline is

    shard URLs (resampled, or split by rank and worker)
      -> tar_samples -> dedupe -> [mix sources] -> shuffle buffer of raw bytes (train)
      -> decode_samples (+ preprocess) -> batched + tokenizer

and each batch carries the worker's skip counts to the main process (``loader.stats``).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import random
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import count, islice
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modx.data.replay import (
    ReplayPlan,
    buffer_picks,
    decode_entry,
    rank_slice,
    view_digest,
    view_seed,
)
from modx.data.samples import decode_samples, dedupe, every, tar_samples
from modx.data.seeds import stable_seed
from modx.data.stats import SkipStats
from modx.data.urls import DataError, Source, parse_sources, shard_sizes

CAPTION_MODES = ("sample", "all", "first")
log = logging.getLogger("modx.data")
MAX_BAD_RUN = 10_000  # an endless stream stops after this many unusable samples in a row


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed, else the RANK/WORLD_SIZE env, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _constant(value: int) -> int:
    return value


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to build its pipeline (decided in the main process)."""

    mode: str
    sources: tuple[tuple[str, ...], ...]  # one tuple of shard URLs per source
    weights: tuple[float, ...] | None  # sampling weights (train, resampled) or None
    rank: int
    world_size: int
    workers: int  # workers actually used (>= 1 here; 0 means "main process" to torch)
    sample_split: bool  # eval with fewer shards than ranks: split samples, not shards
    resampled: bool
    repeat: bool  # train without resampling: loop over passes until the quota is met
    quotas: tuple[int, ...] | None  # batches per worker (train with a known length)
    batch_size: int
    partial: bool
    shuffle: int
    seed: int
    captions: str
    preprocess: Callable | None
    tokenizer: Callable | None
    labels: bool = False  # classification samples: integer class from KEY.cls, no captions
    line_urls: frozenset[str] = frozenset()  # shards whose .txt holds one caption per line
    replay: ReplayPlan | None = None  # train: replayed samples in every batch (modx.data.replay)


def _collate(
    samples: list[dict], tokenizer: Callable | None, with_idx: bool, stats: SkipStats
) -> dict:
    images = [s["image"] for s in samples]
    if all(isinstance(x, torch.Tensor) for x in images):
        images = torch.stack(images)  # (B, 3, H, W)
    stats.samples += len(samples)
    if "label" in samples[0]:  # a classification set
        labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # (B,)
        return {"image": images, "label": labels, "key": [s["key"] for s in samples]}
    texts = [c for s in samples for c in s["captions"]]
    batch = {
        "image": images,
        "text": tokenizer(texts) if tokenizer is not None else texts,  # (M, ctx)
        "key": [s["key"] for s in samples],
    }
    if with_idx:
        batch["text_image_idx"] = torch.tensor(
            [i for i, s in enumerate(samples) for _ in s["captions"]], dtype=torch.long
        )  # (M,)
    return batch


def _pass_shards(
    urls: Sequence[str], plan: _Plan, epoch: int, n_pass: int, worker: int
) -> list[str]:
    """Train without resampling: every pass shuffles all shards with a seed shared by all
    ranks, then takes this rank's and this worker's slice, so a pass reads each shard once."""
    order = list(urls)
    random.Random(stable_seed(plan.seed, epoch, n_pass)).shuffle(order)
    return order[plan.rank :: plan.world_size][worker :: plan.workers]


def _mix(
    streams: list[Iterator[dict]], weights: Sequence[float], rng: random.Random
) -> Iterator[dict]:
    """Draw each sample from source i with probability weights[i] / sum(weights)."""
    while True:
        (i,) = rng.choices(range(len(streams)), weights=weights)
        sample = next(streams[i], None)
        if sample is None:
            return
        yield sample


def _stop_when_idle(shards: Iterable[dict], read: list[int], limit: int) -> Iterator[dict]:
    """Pass shards through, but stop after ``limit`` shards in a row gave no sample at all
    (every shard broken would otherwise loop forever in resampled or repeated mode)."""
    idle, last = 0, read[0]
    for shard in shards:
        idle = idle + 1 if read[0] == last else 0
        last = read[0]
        if idle > limit:
            log.warning("stopping: the last %d shards gave no sample", limit)
            return
        yield shard


def _count(samples: Iterable[dict], read: list[int]) -> Iterator[dict]:
    for sample in samples:
        read[0] += 1
        yield sample


class _StreamDataset(IterableDataset):
    def __init__(self, plan: _Plan, epoch) -> None:
        super().__init__()
        self.plan = plan
        self.epoch = epoch  # multiprocessing.Value shared with persistent workers

    def _raw(self, shards: Iterable[dict], stats: SkipStats) -> Iterator[dict]:
        """Undecoded samples (bytes) of the shards: grouped, deduplicated, rank-split."""
        plan = self.plan
        # With a sample-level split every rank reads the same shards, so shard-level
        # problems and duplicates are counted on rank 0 only.
        shared = stats if not plan.sample_split or plan.rank == 0 else SkipStats()
        read = [0]
        limit = 2 * sum(len(src) for src in plan.sources) + 2
        samples = _count(tar_samples(_stop_when_idle(shards, read, limit), shared), read)
        samples = dedupe(samples, shared, per_shard=plan.mode == "train")
        if plan.sample_split:
            samples = every(samples, plan.rank, plan.world_size)
        return samples

    def _decode(
        self, samples: Iterable[dict], stats: SkipStats, rng: random.Random, endless: bool,
        keep_raw: bool = False,
    ) -> Iterator[dict]:
        plan = self.plan
        captions = "first" if plan.mode == "eval" and plan.captions == "sample" else plan.captions
        max_bad_run = MAX_BAD_RUN if endless else None
        return decode_samples(
            samples, stats, plan.preprocess, captions, rng, max_bad_run,
            labels=plan.labels, line_urls=plan.line_urls, keep_raw=keep_raw,
        )  # fmt: skip

    def _pipeline(self, worker: int, epoch: int, stats: SkipStats) -> Iterator[dict]:
        plan = self.plan
        rng = random.Random(stable_seed(plan.seed, epoch, plan.rank, worker))
        if plan.mode == "eval":
            urls = plan.sources[0][worker :: plan.workers]
            samples = self._decode(self._raw(({"url": u} for u in urls), stats), stats, rng, False)
        elif plan.resampled:
            raw = self._shuffle(self._resampled(worker, epoch, stats, rng), rng)
            keep_raw = plan.replay is not None and plan.replay.keep_raw
            samples = self._decode(raw, stats, rng, endless=True, keep_raw=keep_raw)
        else:
            samples = self._passes(worker, epoch, stats, rng)
        if plan.replay is not None and plan.mode == "train":
            return self._mixed(samples, worker, epoch, stats, rng)
        return self._batches(samples, stats)

    # ---- replay (modx.data.replay): each batch = this rank's fresh samples + its replayed ones

    def _mixed(
        self, fresh: Iterator[dict], worker: int, epoch: int, stats: SkipStats, rng: random.Random
    ) -> Iterator[dict]:
        """Batches of batch_size - counts[rank] fresh samples and counts[rank] replayed ones
        (last). Batch j of worker w is the segment's batch j * workers + w: the DataLoader
        takes batches from its workers in turn, so it is the global micro-batch
        first_batch + that index (+ the batches of earlier epochs)."""
        plan, rp = self.plan, self.plan.replay
        n_replay = rp.counts[plan.rank]
        n_fresh = plan.batch_size - n_replay
        per_epoch = sum(plan.quotas) if plan.quotas is not None else 0
        take = None
        if n_replay:
            take = self._buffer_taker() if rp.entries else self._stream_taker(worker, epoch, stats, rng)
        for j in count():
            batch = rp.first_batch + epoch * per_epoch + j * plan.workers + worker
            part = list(islice(fresh, n_fresh))
            if len(part) < n_fresh:
                return
            if take is not None:
                more = take(batch, {s["key"] for s in part}, n_replay)
                if more is None:
                    return
                part += more
            yield _collate_mixed(part, plan.tokenizer, stats, rp.keep_raw, rp.views)

    def _buffer_taker(self) -> Callable:
        """This rank's share of each global batch's buffer picks, decoded with their views."""
        plan, rp = self.plan, self.plan.replay
        mine = rank_slice(rp.counts, plan.rank)

        def take(batch: int, exclude: set[str], n: int) -> list[dict]:
            picks = buffer_picks(rp, batch)[mine]
            return [decode_entry(rp.entries[i], plan.preprocess, view_seed(rp, batch, mine.start + k))
                    for k, i in enumerate(picks)]

        return take

    def _stream_taker(self, worker: int, epoch: int, stats: SkipStats, rng: random.Random) -> Callable:
        """Replayed samples streamed from the replay sources, mixed by their weights; a
        sample whose key is already in the batch is passed over."""
        rp = self.plan.replay
        streams = [self._replay_raw(urls, i, worker, epoch, stats) for i, urls in enumerate(rp.sources)]
        raw = streams[0] if len(streams) == 1 else _mix(streams, rp.weights, rng)
        samples = self._decode(self._shuffle(raw, rng), stats, rng, endless=True)

        def take(batch: int, exclude: set[str], n: int) -> list[dict] | None:
            out, keys = [], set(exclude)
            for sample in samples:
                if sample["key"] in keys:
                    continue
                keys.add(sample["key"])
                out.append({**sample, "replayed": True, "id": -1})
                if len(out) == n:
                    return out
            return None

        return take

    def _replay_raw(self, urls: tuple[str, ...], source: int, worker: int, epoch: int,
                    stats: SkipStats) -> Iterator[dict]:
        """Endless raw samples of one replay source, this rank's part only: its shards
        (split by a hash of the URL) when every rank gets one, else every shard with the
        samples split by a hash of their key. Either way no two ranks replay one sample."""
        plan = self.plan
        owner = [stable_seed("replay-shard", u) % plan.world_size for u in urls]
        by_shard = len(set(owner)) == plan.world_size
        mine = [u for u, k in zip(urls, owner) if k == plan.rank] if by_shard else list(urls)
        shards = wds.ResampledShards(
            mine,
            seed=stable_seed(plan.seed, epoch, "replay", source),
            worker_seed=partial(_constant, stable_seed(plan.rank, worker, "replay")),
            deterministic=True,
        )
        read = [0]
        samples = _count(tar_samples(_stop_when_idle(iter(shards), read, 2 * len(mine) + 2), stats), read)
        samples = dedupe(samples, stats, per_shard=True)
        if not by_shard:
            samples = (s for s in samples
                       if stable_seed("replay-key", s["__key__"]) % plan.world_size == plan.rank)
        return samples

    def _resampled(
        self, worker: int, epoch: int, stats: SkipStats, rng: random.Random
    ) -> Iterator[dict]:
        """Endless raw samples from shards drawn with replacement, seeded per rank and worker."""
        plan = self.plan
        streams = []
        for i, src in enumerate(plan.sources):
            shards = wds.ResampledShards(
                list(src),
                seed=stable_seed(plan.seed, epoch, i),
                worker_seed=partial(_constant, stable_seed(plan.rank, worker)),
                deterministic=True,
            )
            streams.append(self._raw(iter(shards), stats))
        if len(streams) == 1:
            return streams[0]
        return _mix(streams, plan.weights, rng)

    def _passes(
        self, worker: int, epoch: int, stats: SkipStats, rng: random.Random
    ) -> Iterator[dict]:
        """Shuffled passes over this worker's shards; the buffer drains at each pass end, so
        one pass delivers every sample once. Repeats only when the epoch length is set."""
        plan = self.plan
        for n_pass in count():
            urls = _pass_shards(plan.sources[0], plan, epoch, n_pass, worker)
            raw = self._shuffle(self._raw(({"url": u} for u in urls), stats), rng)
            delivered = 0
            for sample in self._decode(raw, stats, rng, endless=False):
                delivered += 1
                yield sample
            if not plan.repeat or delivered == 0:
                return

    def _shuffle(self, samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
        size = self.plan.shuffle
        return wds.shuffle(size, initial=min(size, 512), rng=rng)(samples) if size > 0 else samples

    def _batches(self, samples: Iterable[dict], stats: SkipStats) -> Iterator[dict]:
        plan = self.plan
        with_idx = plan.mode == "eval" or plan.captions == "all"
        collate = partial(_collate, tokenizer=plan.tokenizer, with_idx=with_idx, stats=stats)
        return wds.batched(plan.batch_size, collation_fn=collate, partial=plan.partial)(samples)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self.epoch.value)
        stats = SkipStats()
        # random augmentations in preprocess: RNGs of their own, seeded per rank, worker and
        # epoch (also without workers: the loader then never moves the main process's RNGs)
        batches = _own_rng(self._pipeline(worker, epoch, stats),
                           stable_seed(self.plan.seed, epoch, self.plan.rank, worker, 1))
        if self.plan.quotas is not None:
            batches = islice(batches, self.plan.quotas[worker])
        for batch in batches:
            batch["stats"] = stats.take()
            yield batch
        yield {"stats": stats.take()}  # skips after the last batch still reach the log


def _handled_signals() -> tuple[int, ...]:
    """The signals this process handles in Python (a training run's preemption signals)."""
    names = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")
    plain = (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler, None)
    return tuple(int(getattr(signal, n)) for n in names if signal.getsignal(getattr(signal, n)) not in plain)


def _ignore_signals(signals: tuple[int, ...], worker_id: int) -> None:
    """A worker ignores the signals its process handles: a preemption signal sent to the
    whole process group must not kill the workers before the checkpoint is written."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def _identity(x):
    return x


def _worker_context():
    """Fork the loader's workers on Linux, however this process was started: a process
    started with spawn (modx-bench's runs, any multiprocessing spawn child) would otherwise
    spawn its workers too, and each would get a pickled copy of the dataset (the replay
    buffer's snapshot: 855 MB more for 306 MB of samples with 2 workers) and import torch
    anew. Forked workers share those pages with the main process. Elsewhere: the default."""
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return None


def _own_rng(items: Iterator[dict], seed: int) -> Iterator[dict]:
    """`items` run with torch, random and numpy RNGs of their own, seeded by `seed`; the
    caller's RNG states are restored around every step."""
    mine = None
    while True:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            if mine is None:
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
            else:
                _set_rng(mine)
            item = next(items, None)
            mine = torch.get_rng_state(), random.getstate(), np.random.get_state()
        finally:
            _set_rng(saved)
        if item is None:
            return
        yield item


def _set_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def _collate_mixed(samples: list[dict], tokenizer: Callable | None, stats: SkipStats, keep_raw: bool,
                   views: bool = False) -> dict:
    """A training batch with replayed samples: `replayed` (per row), `sample_id` (a buffered
    sample's id in the stream of trained samples, else -1), with `views` `view` (a digest
    of each replayed row's input, 0 for fresh rows: modx.data.replay.view_digest) and, with
    `keep_raw`, `raw`: the fresh samples as they came from the shard, for the buffer."""
    batch = _collate(samples, tokenizer, with_idx=False, stats=stats)
    flags = [bool(s.get("replayed")) for s in samples]
    batch["replayed"] = flags
    batch["sample_id"] = [s.get("id", -1) if f else -1 for s, f in zip(samples, flags)]
    if views and torch.is_tensor(batch["image"]) and torch.is_tensor(batch["text"]):
        batch["view"] = [view_digest(batch["image"][i], batch["text"][i]) if f else 0 for i, f in enumerate(flags)]
    if keep_raw:
        batch["raw"] = [s["raw"] for s, f in zip(samples, flags) if not f]
    return batch


class StreamLoader:
    """Iterable over dict batches of one rank (a torch DataLoader wrapper).

    ``stats`` accumulates the delivered/skipped counts of all workers; ``workers`` is the
    number of workers actually used; ``len()`` is the number of batches per epoch on this
    rank when known (``num_batches``; for eval an upper bound, corrupt samples lower it).
    Each ``iter()`` starts a new epoch (reshuffled, reseeded); ``set_epoch`` overrides it.
    """

    def __init__(self, plan: _Plan, num_workers: int, num_batches: int | None, pin_memory: bool):
        self.plan = plan
        self.workers = num_workers
        self.num_batches = num_batches
        self.stats = SkipStats()
        self._next_epoch = 0
        self._epoch = mp.Value("q", 0, lock=False)  # written only by the main process
        self._loader: DataLoader | None = DataLoader(
            _StreamDataset(plan, self._epoch),
            batch_size=None,  # batches are built inside the workers
            num_workers=num_workers,
            collate_fn=_identity,
            persistent_workers=num_workers > 0,
            multiprocessing_context=_worker_context() if num_workers > 0 else None,
            worker_init_fn=partial(_ignore_signals, _handled_signals()) if num_workers > 0 else None,
            pin_memory=pin_memory,
        )

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        if self._loader is None:
            raise RuntimeError("this StreamLoader was closed")
        self._epoch.value = self._next_epoch
        self._next_epoch += 1
        for item in self._loader:
            self.stats.update(item.pop("stats"))
            if "image" in item:
                yield item

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(
                "the number of batches is unknown: no sizes.json/__len__ beside the shards "
                "and no budget_samples/budget_steps"
            )
        return self.num_batches

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage collected)."""
        self._loader = None

    def __enter__(self) -> StreamLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split_count(n: int, parts: int, index: int) -> int:
    return n // parts + (index < n % parts)


def make_loader(
    urls: str | Sequence[str],
    *,
    mode: str,
    batch_size: int,
    preprocess: Callable | None,
    tokenizer: Callable | None,
    workers: int = 2,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = True,
    shuffle: int = 1000,
    budget_samples: int | None = None,
    budget_steps: int | None = None,
    captions: str = "sample",
    drop_last: bool | None = None,
    weights: Sequence[float] | None = None,
    pin_memory: bool = False,
    missing_ok: bool = False,
    labels: bool = False,
    replay: ReplayPlan | None = None,
) -> StreamLoader:
    """Build this rank's loader over WebDataset shards (see modx.data.urls for ``urls``).

    mode="train": endless resampled shard streams seeded per (seed, epoch, rank, worker)
    (``resampled=False``: shards split across ranks and workers, reshuffled every pass),
    a ``shuffle``-sample buffer, one caption per image ("sample": random, "first"), full
    batches (``drop_last`` default True). The epoch is ``budget_steps`` batches per rank,
    else ``budget_samples`` (global), else one pass over the sizes in ``sizes.json``.

    mode="eval": one deterministic pass, each sample exactly once over all ranks and
    workers, partial last batches, ``captions="all"`` gives every caption with
    ``text_image_idx`` (``"sample"`` means "first" here); weights and budgets do not apply.

    ``labels=True`` reads classification samples (CLIP_benchmark layout): each batch holds
    ``label`` (B,), the integer class from ``KEY.cls``, instead of ``text``. A CLIP_benchmark
    directory may stand for shards (its test split); for a retrieval set (dataset_type.txt
    = retrieval) every line of ``KEY.txt`` is a caption.

    ``preprocess`` maps a PIL RGB image to a tensor and ``tokenizer`` a list of strings to
    a (M, ctx) tensor (open_clip's); None keeps PIL images / strings. ``rank`` and
    ``world_size`` default to torch.distributed / RANK, WORLD_SIZE.

    ``replay`` (mode="train"): every batch of ``batch_size`` holds ``replay.counts[rank]``
    replayed samples, last, and the rest fresh (modx.data.replay): batches then also carry
    ``replayed``, ``sample_id``, ``view`` (lists, one entry per row) and, with
    ``replay.keep_raw``, ``raw`` (the fresh samples as they came from the shard).

    Shards that vanish or become unreadable while the loader runs are skipped and counted
    (``open_error``). ``missing_ok=True`` also builds a loader when local shards are
    missing already (a long run rebuilding its loader): they are counted the same way.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"need batch_size >= 1 and workers >= 0, got {batch_size}, {workers}")
    if rank is None or world_size is None:
        rank, world_size = dist_info()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if replay is not None:
        if mode != "train" or len(replay.counts) != world_size or replay.counts[rank] > batch_size:
            raise ValueError(f"replay needs mode='train', one count per rank ({world_size}) and at most "
                             f"batch_size ({batch_size}) replayed samples, got {replay.counts}")
    sources = parse_sources(urls, weights, missing_ok=missing_ok)
    if mode == "eval":
        if budget_samples is not None or budget_steps is not None:
            raise ValueError("budget_samples/budget_steps apply to mode='train' only")
        lay = _eval_layout(sources, rank, world_size, workers, batch_size)
    else:
        budget = (budget_samples, budget_steps)
        lay = _train_layout(sources, rank, world_size, workers, batch_size, resampled, budget)
    if lay.workers < workers:
        log.log(
            logging.INFO if mode == "eval" else logging.WARNING,
            "%d shard(s) for %d rank(s) x %d workers: using %d worker(s) on rank %d",
            *(sum(len(s.urls) for s in sources), world_size, workers, lay.workers, rank),
        )
    if drop_last is None:
        drop_last = mode == "train"
    plan = _Plan(
        mode=mode,
        sources=lay.sources,
        weights=lay.weights,
        rank=rank,
        world_size=world_size,
        workers=max(lay.workers, 1),
        sample_split=lay.sample_split,
        resampled=resampled and mode == "train",
        repeat=lay.num_batches is not None and mode == "train",
        quotas=lay.quotas,
        batch_size=batch_size,
        partial=not drop_last,
        shuffle=shuffle if mode == "train" else 0,
        seed=seed,
        captions=captions,
        preprocess=preprocess,
        tokenizer=tokenizer,
        labels=labels,
        line_urls=frozenset(u for s in sources if s.caption_lines for u in s.urls),
        replay=replay,
    )
    return StreamLoader(plan, lay.workers, lay.num_batches, pin_memory)


class _Layout(NamedTuple):
    """How one rank's data is laid out over its workers, decided before anything starts."""

    sources: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...] | None
    workers: int  # workers to use (<= requested; never more than there are shards to read)
    num_batches: int | None  # batches per epoch on this rank
    quotas: tuple[int, ...] | None  # batches per worker
    sample_split: bool


def _eval_layout(
    sources: list[Source], rank: int, world: int, workers: int, batch_size: int
) -> _Layout:
    """Shards split over ranks, then workers; with fewer shards than ranks, every rank
    reads them all and keeps every ``world``-th sample. No worker is left without shards."""
    urls = tuple(u for s in sources for u in s.urls)
    sample_split = len(urls) < world
    mine = urls if sample_split else urls[rank::world]
    use = min(workers, len(mine))
    num_batches = _eval_batches(mine, max(use, 1), batch_size, rank, world, sample_split)
    return _Layout((mine,), None, use, num_batches, None, sample_split)


def _train_layout(
    sources: list[Source],
    rank: int,
    world: int,
    workers: int,
    batch_size: int,
    resampled: bool,
    budget: tuple[int | None, int | None],
) -> _Layout:
    """Resampled: every worker draws from all shards. Split: at least one shard per worker
    (fewer workers if needed), refused when there are fewer shards than ranks."""
    urls = tuple(u for s in sources for u in s.urls)
    weighted = any(s.weight is not None for s in sources)
    if weighted and not resampled:
        raise DataError(f"source weights in {[s.pattern for s in sources]} need resampled=True")
    if resampled:
        use = workers
    elif len(urls) < world:
        raise DataError(
            f"{len(urls)} shard(s) cannot be split over {world} ranks without "
            "resampling: use resampled=True or write more, smaller shards"
        )
    else:
        use = min(workers, len(urls) // world)
    num_batches = _train_batches(urls, batch_size, world, *budget)
    quotas = None
    if num_batches is not None:
        quotas = tuple(_split_count(num_batches, max(use, 1), w) for w in range(max(use, 1)))
    if weighted:
        return _Layout(
            tuple(s.urls for s in sources),
            tuple(1.0 if s.weight is None else s.weight for s in sources),
            *(use, num_batches, quotas, False),
        )
    return _Layout((urls,), None, use, num_batches, quotas, False)


def _train_batches(
    urls: Sequence[str],
    batch_size: int,
    world_size: int,
    budget_samples: int | None,
    budget_steps: int | None,
) -> int | None:
    """Batches per rank per epoch: the step budget, the sample budget, or one pass."""
    if budget_steps is not None:
        return int(budget_steps)
    global_batch = batch_size * world_size
    if budget_samples is not None:
        return math.ceil(budget_samples / global_batch)
    sizes = shard_sizes(urls)
    if sizes is None:
        return None
    if sum(sizes) < global_batch:
        raise DataError(
            f"the shards hold {sum(sizes)} samples, fewer than one global batch "
            f"({batch_size} x {world_size} ranks)"
        )
    return sum(sizes) // global_batch


def _eval_batches(
    urls: Sequence[str], workers: int, batch_size: int, rank: int, world: int, sample_split: bool
) -> int | None:
    """Expected eval batches on this rank (each worker ends with a partial batch)."""
    sizes = shard_sizes(urls)
    if sizes is None:
        return None
    total = 0
    for w in range(workers):
        n = sum(sizes[w::workers])
        if sample_split:
            n = max(0, n - rank + world - 1) // world
        total += math.ceil(n / batch_size)
    return total

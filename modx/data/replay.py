"""Replay: which samples of each batch come from earlier phases, and from where.

The share is one of the GLOBAL batch. With ratio r and a global batch of B samples, every
micro-batch holds R = round(r * B) replayed samples and B - R fresh ones, whatever the
number of processes: process k replays ``replay_counts(B, r, N)[k]`` of them (the counts
sum to R) and reads the rest from the current phase. Two sources (strategy.replay.source):

- ``stream``: earlier phases' training shards (and ``replay.data``, e.g. a slice of the
  pretraining data) streamed from storage beside the current phase, as TiC-CLIP replays
  its past data. The replay share is split over those sources by ``schedule_weights``.
  Memory does not grow with the replay set; every replayed sample is decoded and augmented
  anew. Each process reads its own part of the replay shards (shards split by a hash of
  their URL, or samples by a hash of their key when a source has too few shards), so no
  sample is replayed twice in one global batch.
- ``buffer``: ``ReplayBuffer``, a bounded reservoir of the samples that were trained on,
  kept as they came from the shard (encoded image bytes, captions, key), bounded by a
  number of samples and of megabytes. The reservoir is one logical buffer over the global
  stream: every process takes the same decisions and holds the same samples (each new one
  is sent to every process once), so a run replays the same samples on 1 or 8 processes
  and resumes on another number of processes exactly. It is saved as a WebDataset shard.

Both are read inside the loader's workers (modx.data.loader), which build each batch from
B/N - count fresh samples and `count` replayed ones, decoded and augmented there. A loader
segment (see modx.train.data) replays from a ``ReplayPlan``: the stream's sources and
weights, or a snapshot of the buffer's samples from earlier phases taken when the segment
starts. A buffered sample's view (augmentation and caption) is seeded by its place in the
global batch, so the same global batch is built on any number of processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modx.data.seeds import preserved_rng, stable_seed

STATE_TAR, STATE_JSON = "replay.tar", "replay.json"  # the buffer's files in a checkpoint


def replay_counts(global_batch: int, ratio: float, world: int, available: int | None = None) -> list[int]:
    """Replayed samples per process in one micro-batch: R = round(ratio * global_batch)
    (at most `available`, the samples there are to replay) split as evenly as possible
    over `world` processes, the first R % world processes taking one more."""
    total = math.floor(ratio * global_batch + 0.5)
    if available is not None:
        total = min(total, available)
    return [total // world + (k < total % world) for k in range(world)]


def schedule_weights(schedule: str, sizes: Sequence[float]) -> list[float]:
    """How the replay share is split over the replay sources, listed oldest first (the
    user's replay.data, then phase 0, 1, ...). TiC-CLIP's cumulative schedules:

    - ``equal``: the same share for every source;
    - ``all``: shares proportional to `sizes` (samples per source): every earlier sample
      is equally likely, as if all earlier data were one pool;
    - ``exp``: the newest source half, the one before a quarter, ..., the oldest the rest
      (so the two oldest share equally).
    """
    n = len(sizes)
    if n == 0:
        return []
    if schedule == "equal":
        return [1.0 / n] * n
    if schedule == "all":
        total = float(sum(sizes))
        return [s / total for s in sizes]
    if schedule == "exp":
        weights = [0.5 ** (n - i) for i in range(n)]  # oldest first: 1/2^n ... 1/2
        weights[0] *= 2  # the oldest takes the rest
        return weights
    raise ValueError(f"unknown replay schedule {schedule!r}; choose equal, all or exp")


@dataclass(frozen=True)
class Entry:
    """One buffered sample as it came from its shard, and where it came from."""

    id: int  # its index in the global stream of trained samples
    phase: int
    step: int  # the global optimiser step that trained on it
    key: str
    ext: str  # image extension (jpg, png, webp)
    image: bytes  # encoded image
    captions: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return len(self.image) + sum(len(c) for c in self.captions) + len(self.key)


@dataclass(frozen=True)
class ReplayPlan:
    """What one loader segment replays (picklable: it travels to the workers).

    `counts[k]`: replayed samples in each micro-batch of process k. `first_batch`: the
    global index of the segment's first micro-batch (batch i of the segment is global
    micro-batch first_batch + i; picks and views are seeded by it). `entries`: the buffer
    snapshot to replay from (source buffer); `sources`/`weights`: shard URLs per replay
    source and their shares (source stream). `keep_raw`: attach the fresh samples' encoded
    form to each batch (the buffer stores them)."""

    counts: tuple[int, ...]
    first_batch: int
    seed: int
    phase: int
    entries: tuple[Entry, ...] = ()
    sources: tuple[tuple[str, ...], ...] = ()
    weights: tuple[float, ...] = ()
    keep_raw: bool = False
    views: bool = False  # digest each replayed row's input (Mod-X's teacher cache is keyed by it)

    @property
    def total(self) -> int:
        return sum(self.counts)


def rank_slice(counts: Sequence[int], rank: int) -> slice:
    """The positions of process `rank`'s replayed samples in the global replay block."""
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def buffer_picks(plan: ReplayPlan, batch: int) -> list[int]:
    """Indices into `plan.entries` of the R samples global micro-batch `batch` replays:
    distinct, drawn uniformly, the same on every process."""
    rng = np.random.default_rng(stable_seed(plan.seed, "replay-pick", plan.phase, batch))
    return rng.choice(len(plan.entries), size=plan.total, replace=False).tolist()


def view_seed(plan: ReplayPlan, batch: int, position: int) -> int:
    """Seed of the view (augmentation, caption) of the replayed sample at `position` of
    global micro-batch `batch`'s replay block: a new view every time, the same on any
    number of processes."""
    return stable_seed(plan.seed, "replay-view", plan.phase, batch, position)


def decode_entry(entry: Entry, preprocess: Callable | None, seed: int) -> dict[str, Any]:
    """A buffered sample decoded and augmented anew: `preprocess` runs under RNGs seeded
    by `seed` (torch, random, numpy: restored afterwards), and one caption is drawn."""
    with Image.open(io.BytesIO(entry.image)) as img:
        image = img.convert("RGB")
    if preprocess is not None:
        image = seeded(preprocess, seed, image)
    caption = random.Random(seed).choice(entry.captions)
    return {"key": entry.key, "image": image, "captions": [caption], "replayed": True, "id": entry.id}


def seeded(fn: Callable, seed: int, *args: Any) -> Any:
    """fn(*args) with the global torch, random and numpy RNGs seeded by `seed`, each
    restored afterwards (so the caller's random streams do not move)."""
    with preserved_rng():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return fn(*args)


def view_digest(image: torch.Tensor, text: torch.Tensor) -> int:
    """A 63-bit digest of one view's input (image tensor and tokens without padding):
    equal digests mean equal inputs (Mod-X's teacher cache is keyed by it)."""
    tokens = text[text != 0]  # padding (token 0) cut or not: the same view
    h = hashlib.blake2b(digest_size=8)
    h.update(image.detach().cpu().contiguous().numpy().tobytes())
    h.update(tokens.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


# ----------------------------------------------------------------------------- the buffer


class ReplayBuffer:
    """A reservoir of trained samples, kept encoded, the same on every process.

    Every sample of the global stream of trained samples has an id (0, 1, ...). Sample n
    goes to slot n while the buffer fills, then to a slot drawn uniformly from 0..n
    (Vitter's algorithm R: every sample seen so far is kept with equal probability). When
    the samples' bytes exceed `max_bytes`, random slots are emptied until they fit. The
    random draws depend only on (seed, n), so every process takes the same decisions; the
    process that read a new sample sends it to the others once (`exchange`).
    """

    def __init__(self, capacity: int, max_bytes: int, seed: int):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.seed = seed
        self.slots: list[Entry | None] = [None] * capacity
        self.seen = 0  # samples of the global stream offered so far
        self.nbytes = 0
        self.peak_bytes = 0
        self.seconds = 0.0  # time spent adding and exchanging (a cost of the buffer)

    def __len__(self) -> int:
        return sum(e is not None for e in self.slots)

    def add(
        self,
        raw: Sequence[tuple[str, str, bytes, tuple[str, ...]]],
        fresh_counts: Sequence[int],
        rank: int,
        phase: int,
        step: int,
        exchange: Callable[[list], list[list]] | None = None,
    ) -> None:
        """Offer one micro-batch's fresh samples. `raw`: this process's (key, ext, image
        bytes, captions), `fresh_counts[k]`: fresh samples of process k (together the
        global micro-batch, in process order). `exchange(items)` returns every process's
        `items` (torch.distributed all_gather_object); None on one process."""
        start = time.perf_counter()
        total = sum(fresh_counts)
        if len(raw) != fresh_counts[rank]:
            raise ValueError(f"{len(raw)} fresh samples offered, {fresh_counts[rank]} expected")
        n = self.seen + np.arange(total)
        rng = np.random.default_rng(stable_seed(self.seed, "replay-reservoir", self.seen))
        drawn = rng.integers(0, n + 1)  # one draw per sample, whether the buffer is full or not
        slots = np.where(n < self.capacity, n, drawn)
        final: dict[int, int] = {}  # slot -> position in the global micro-batch (the last wins)
        for position, slot in enumerate(slots.tolist()):
            if slot < self.capacity:
                final[slot] = position
        if final:
            offset = sum(fresh_counts[:rank])
            mine = [(p, raw[p - offset]) for p in sorted(set(final.values())) if offset <= p < offset + len(raw)]
            arrived = dict(item for part in (exchange(mine) if exchange else [mine]) for item in part)
            for slot, position in final.items():
                key, ext, image, captions = arrived[position]
                self._put(slot, Entry(self.seen + position, phase, step, key, ext, bytes(image), tuple(captions)))
            self._fit()
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self.seen += total
        self.seconds += time.perf_counter() - start

    def _put(self, slot: int, entry: Entry | None) -> None:
        old = self.slots[slot]
        self.nbytes += (entry.nbytes if entry else 0) - (old.nbytes if old else 0)
        self.slots[slot] = entry

    def _fit(self) -> None:
        """Empty random slots until the samples' bytes fit in max_bytes."""
        if self.nbytes <= self.max_bytes:
            return
        rng = np.random.default_rng(stable_seed(self.seed, "replay-evict", self.seen))
        full = [i for i, e in enumerate(self.slots) if e is not None]
        for i in rng.permutation(full).tolist():
            if self.nbytes <= self.max_bytes:
                break
            self._put(i, None)

    def forget_steps(self, steps: set[int]) -> int:
        """Drop the samples of optimiser steps that were skipped (not trained on); returns
        how many were dropped."""
        dropped = [i for i, e in enumerate(self.slots) if e is not None and e.step in steps]
        for i in dropped:
            self._put(i, None)
        return len(dropped)

    def earlier(self, phase: int) -> tuple[Entry, ...]:
        """The buffered samples of phases before `phase`, in slot order (a snapshot)."""
        return tuple(e for e in self.slots if e is not None and e.phase < phase)

    # ---- checkpoint: a WebDataset shard of the samples + JSON, never pickles or tensors

    def save(self, directory: Path) -> None:
        """Write `directory`/replay.tar (one sample per filled slot: KEY.ext image bytes,
        KEY.json with captions, key, id, phase, step) and replay.json (the rest)."""
        write_entries(directory / STATE_TAR, [(slot, e) for slot, e in enumerate(self.slots) if e is not None])
        state = {"version": 1, "capacity": self.capacity, "max_bytes": self.max_bytes, "seed": self.seed,
                 "seen": self.seen, "peak_bytes": self.peak_bytes, "seconds": self.seconds}
        (directory / STATE_JSON).write_text(json.dumps(state))

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote; a buffer of another capacity keeps the samples of
        the slots it has (the others are dropped) and reports nothing else changed."""
        state = json.loads((directory / STATE_JSON).read_text())
        self.seen, self.peak_bytes = int(state["seen"]), int(state.get("peak_bytes", 0))
        self.seconds = float(state.get("seconds", 0.0))
        self.slots, self.nbytes = [None] * self.capacity, 0
        for slot, entry in read_entries(directory / STATE_TAR):
            if slot < self.capacity:
                self._put(slot, entry)
        self._fit()


def write_entries(path: Path, entries: Sequence[tuple[int, Entry]]) -> None:
    """Write (slot, Entry) pairs as a WebDataset shard: SLOT.ext the image bytes, SLOT.json
    the captions, key, id, phase and step."""
    import webdataset as wds

    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for slot, e in entries:
            meta = {"captions": list(e.captions), "key": e.key, "id": e.id, "phase": e.phase, "step": e.step}
            writer.write({"__key__": f"{slot:09d}", e.ext: e.image, "json": json.dumps(meta).encode()})
        writer.close()


def read_entries(path: Path) -> list[tuple[int, Entry]]:
    """(slot, Entry) of every sample in a shard written by write_entries."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    out = []
    for key, files in members.items():
        meta = json.loads(files.pop("json"))
        (ext, image), = files.items()
        entry = Entry(meta["id"], meta["phase"], meta["step"], meta["key"], ext, image, tuple(meta["captions"]))
        out.append((int(key), entry))
    return out

"""write_shards: samples -> img2dataset-layout tar shards + sizes.json (webdataset.ShardWriter)."""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterable
from itertools import chain

import webdataset as wds


def write_shards(
    samples: Iterable[dict],
    out_dir: str,
    prefix: str = "train",
    maxcount: int = 1000,
    *,
    maxsize: float = 3e9,
) -> list[str]:
    """Write samples to ``out_dir/PREFIX-000000.tar, ...`` and record their counts.

    Each sample is a dict with ``__key__`` (no dots) and members such as ``png``/``jpg``
    (bytes), ``txt`` (str) and ``json`` (dict). The per-shard counts are merged into
    ``out_dir/sizes.json``; older ``PREFIX-*.tar`` beyond the new ones are removed.
    Returns the shard paths (none, and no file written, when there are no samples).
    """
    os.makedirs(out_dir, exist_ok=True)
    counts: dict[str, int] = {}
    samples = iter(samples)
    first = next(samples, None)
    if first is not None:  # (ShardWriter would leave an empty tar for no samples)
        pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
        # An integer mtime keeps tarfile from adding a PAX header to every member.
        mtime = int(time.time())
        with wds.ShardWriter(
            pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=mtime
        ) as sink:
            for sample in chain([first], samples):
                if "." in sample["__key__"]:
                    raise ValueError(f"sample key {sample['__key__']!r} must not contain a dot")
                sink.write(sample)
                name = os.path.basename(sink.fname)
                counts[name] = counts.get(name, 0) + 1
    old = {os.path.basename(p) for p in glob.glob(os.path.join(out_dir, f"{prefix}-[0-9]*.tar"))}
    stale = old - set(counts)
    for name in stale:  # shards of an earlier, larger run with the same prefix
        os.remove(os.path.join(out_dir, name))
    update_sizes(out_dir, counts, remove=stale)
    return [os.path.join(out_dir, name) for name in sorted(counts)]


def update_sizes(out_dir: str, counts: dict[str, int], remove: Iterable[str] = ()) -> None:
    """Merge shard sample counts into ``out_dir/sizes.json`` (written atomically)."""
    path = os.path.join(out_dir, "sizes.json")
    sizes: dict[str, int] = {}
    if os.path.isfile(path):
        with open(path) as f:
            sizes = json.load(f)
    for name in remove:
        sizes.pop(name, None)
    sizes.update(counts)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(sorted(sizes.items())), f, indent=1)
    os.replace(tmp, path)

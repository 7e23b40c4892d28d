"""Shard URL specs: brace expansion, `::` sources with `@weight`, local checks, sizes.

Syntax (one string):  ``SRC[@WEIGHT]::SRC[@WEIGHT]::...``  where each SRC is a brace
pattern (``data/a/train-{000000..000099}.tar``), a glob (``data/a/*.tar``), a directory
(all ``*.tar`` inside; for a CLIP_benchmark webdataset directory, the shards of its
``test`` split: ``ROOT/test/{0..N-1}.tar`` with N from ``ROOT/test/nshards.txt``), a
``pipe:COMMAND`` or a ``scheme://`` URL. Without weights the
sources are concatenated into one shard list; with a weight on any source, samples are
drawn from source i with probability weight_i / sum(weights) (missing weights count 1).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import braceexpand

_WEIGHT = re.compile(r"^(.*\S)@(\d+(?:\.\d*)?|\.\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(ValueError):
    """A problem with the user's data or data arguments; the CLIs print it and exit 2."""


@dataclass(frozen=True)
class Source:
    """One `::`-separated source: its pattern, expanded shard URLs and optional weight."""

    pattern: str
    urls: tuple[str, ...]
    weight: float | None = None
    caption_lines: bool = False  # a CLIP_benchmark retrieval set: one caption per line of .txt


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _local_path(url: str) -> str:
    return os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url)


def expand_pattern(pattern: str, missing_ok: bool = False) -> list[str]:
    """Expand one source pattern to shard URLs; raise DataError if local shards are missing.

    ``missing_ok`` (a run that checked its shards when it started): a missing shard keeps
    its place in the list, so the reader counts it (``open_error``) and the other shards
    keep their positions; only a pattern that matches nothing at all still raises.
    """
    urls: list[str] = []
    missing: list[str] = []
    for url in braceexpand.braceexpand(pattern.strip()):
        if _is_remote(url):
            urls.append(url)
            continue
        path = _local_path(url)
        if _GLOB_CHARS.search(path):
            urls.extend(sorted(glob.glob(path)))
        elif os.path.isdir(path):
            urls.extend(benchmark_shards(path) or sorted(glob.glob(os.path.join(path, "*.tar"))))
        elif os.path.isfile(path):
            urls.append(path)
        else:
            missing.append(path)
            if missing_ok:
                urls.append(path)
    if not urls:
        hint = f" (e.g. {missing[0]} does not exist)" if missing else ""
        raise DataError(f"no shards matched {pattern!r}{hint}")
    if missing and not missing_ok:
        raise DataError(
            f"{len(missing)} of {len(urls) + len(missing)} shards of {pattern!r} do not exist, "
            f"e.g. {missing[0]} (a glob like dir/*.tar or the directory takes those that do)"
        )
    return urls


def benchmark_shards(root: str, split: str = "test") -> list[str] | None:
    """The shard paths of a CLIP_benchmark webdataset directory's split (``ROOT/SPLIT/0.tar``
    ... as ``ROOT/SPLIT/nshards.txt`` counts them), or None when ``root`` is not one."""
    count = os.path.join(root, split, "nshards.txt")
    if not os.path.isfile(count):
        return None
    with open(count) as f:
        text = f.read().strip()
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"{count} must hold a positive number of shards, got {text!r}")
    urls = [os.path.join(root, split, f"{i}.tar") for i in range(int(text))]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"{count} says {text} shards but {missing[0]} does not exist")
    return urls


def is_retrieval_benchmark(pattern: str) -> bool:
    """Whether ``pattern`` names a CLIP_benchmark directory whose dataset_type.txt says retrieval."""
    path = _local_path(pattern.strip())
    kind = os.path.join(path, "dataset_type.txt")
    if _is_remote(pattern) or not os.path.isfile(kind):
        return False
    with open(kind) as f:
        return f.read().strip().lower() == "retrieval"


def parse_sources(
    urls: str | Sequence[str], weights: Sequence[float] | None = None, missing_ok: bool = False
) -> list[Source]:
    """Split a URL spec into sources (``::``, ``@weight``) and expand each one.

    A list of strings is treated like the same strings joined by ``::``. ``weights``, when
    given, overrides the ``@weight`` suffixes and must have one entry per source.
    ``missing_ok``: see `expand_pattern`.
    """
    if isinstance(urls, str):
        parts = urls.split("::")
    else:
        parts = [p for u in urls for p in str(u).split("::")]
    parts = [p for p in (p.strip() for p in parts) if p]
    if not parts:
        raise DataError("no shard URLs given")
    if weights is not None and len(weights) != len(parts):
        raise DataError(f"{len(weights)} weights given for {len(parts)} sources in {urls!r}")
    sources = []
    for i, part in enumerate(parts):
        weight = None
        match = _WEIGHT.match(part)
        if match:
            part, weight = match.group(1), float(match.group(2))
        if weights is not None:
            weight = float(weights[i])
        if weight is not None and weight < 0:
            raise DataError(f"negative weight {weight} for source {part!r}")
        sources.append(Source(part, tuple(expand_pattern(part, missing_ok)), weight, is_retrieval_benchmark(part)))
    if all(s.weight is not None for s in sources) and sum(s.weight for s in sources) <= 0:
        raise DataError(f"source weights in {urls!r} sum to zero")
    return sources


def _dir_sizes(directory: str) -> tuple[dict[str, int] | None, int | None]:
    sizes = total = None
    path = os.path.join(directory, "sizes.json")
    if os.path.isfile(path):
        with open(path) as f:
            sizes = {str(k): int(v) for k, v in json.load(f).items()}
    path = os.path.join(directory, "__len__")
    if os.path.isfile(path):
        with open(path) as f:
            total = int(f.read().strip())
    return sizes, total


def shard_sizes(urls: Sequence[str]) -> list[int] | None:
    """Samples per shard from ``sizes.json`` beside the shards (or ``__len__``, the total of
    the listed shards, spread evenly); None when any shard's size is unknown."""
    out: list[int] = []
    by_dir: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        if _is_remote(url):
            return None
        path = _local_path(url)
        by_dir.setdefault(os.path.dirname(os.path.abspath(path)), []).append(i)
        out.append(-1)
    for directory, idx in by_dir.items():
        sizes, total = _dir_sizes(directory)
        names = [os.path.basename(urls[i]) for i in idx]
        if sizes is not None and all(n in sizes for n in names):
            for i, n in zip(idx, names):
                out[i] = sizes[n]
        elif total is not None:
            for j, i in enumerate(idx):
                out[i] = total // len(idx) + (j < total % len(idx))
        else:
            return None
    return out

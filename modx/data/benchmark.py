"""CLIP_benchmark's webdataset layout: read a dataset directory, write one, and the
zero-shot sets of the built-in data.

    ROOT/classnames.txt                          one class name per line, in label order
    ROOT/zeroshot_classification_templates.txt   one prompt per line, {c} = the class name
    ROOT/dataset_type.txt                        optional: "retrieval" (else classification)
    ROOT/test/nshards.txt                        N
    ROOT/test/0.tar ... ROOT/test/{N-1}.tar      KEY.webp|png|jpg + KEY.cls (label) or
                                                 KEY.txt (retrieval: one caption per line)

The directory itself stands for its test shards wherever shard URLs are accepted
(modx.data.urls); this module reads the class names and templates beside them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import webdataset as wds

from modx.data.urls import DataError, benchmark_shards

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
ZEROSHOT_VERSION = 1  # bump when the built-in zero-shot sets change


@dataclass(frozen=True)
class BenchmarkSet:
    """A CLIP_benchmark dataset directory: its kind, shards, class names and templates."""

    root: str
    kind: str  # "classification" | "retrieval" | "multilabel"
    urls: tuple[str, ...]  # shard paths of the split
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def read_benchmark(root: str, split: str = "test") -> BenchmarkSet:
    """Read a CLIP_benchmark directory; DataError names the missing or malformed file."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError(f"dataset directory not found: {root}")
    urls = benchmark_shards(root, split)
    if urls is None:
        raise DataError(
            f"{root} is not a CLIP_benchmark webdataset directory: no {os.path.join(root, split, 'nshards.txt')}"
        )
    type_path = os.path.join(root, DATASET_TYPE)
    kind = "classification"
    if os.path.isfile(type_path):
        kind = (_lines(type_path) or ["classification"])[0].lower()
    if kind != "classification":
        return BenchmarkSet(root, kind, tuple(urls))
    paths = {name: os.path.join(root, name) for name in (CLASSNAMES, TEMPLATES)}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DataError(f"{root} has no {os.path.basename(path)} (needed for zero-shot classification)")
    classnames, templates = _lines(paths[CLASSNAMES]), _lines(paths[TEMPLATES])
    if not classnames:
        raise DataError(f"{paths[CLASSNAMES]} is empty")
    if not templates:
        raise DataError(f"{paths[TEMPLATES]} is empty")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise DataError(f"{paths[TEMPLATES]}: template {bad[0]!r} has no {{c}} for the class name")
    return BenchmarkSet(root, kind, tuple(urls), tuple(classnames), tuple(templates))


def write_benchmark(
    root: str,
    samples: Iterable[dict],
    *,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    retrieval: bool = False,
    split: str = "test",
    maxcount: int = 10_000,
) -> BenchmarkSet:
    """Write samples (``__key__``, an image member such as ``png`` (bytes), and ``cls``
    (int) or, with ``retrieval``, ``txt`` (a list of captions)) in CLIP_benchmark's layout."""
    if retrieval == (classnames is not None):
        raise ValueError("give classnames and templates for a classification set, or retrieval=True")
    os.makedirs(os.path.join(root, split), exist_ok=True)
    if retrieval:
        _write_lines(os.path.join(root, DATASET_TYPE), ["retrieval"])
    else:
        _write_lines(os.path.join(root, CLASSNAMES), classnames)
        _write_lines(os.path.join(root, TEMPLATES), templates or [])
    pattern = os.path.join(root, split, "%d.tar")
    n = 0
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, mtime=int(time.time())) as sink:
        for sample in samples:
            if retrieval:
                sample = {**sample, "txt": "\n".join(c.replace("\n", " ") for c in sample["txt"])}
            sink.write(sample)
            n += 1
        shards = sink.shard
    if n == 0:
        raise ValueError(f"no samples to write to {root}")
    _write_lines(os.path.join(root, split, "nshards.txt"), [str(shards)])
    return read_benchmark(root, split)


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def ensure_builtin_zeroshot(name: str, root: str = "data", classes: Sequence[str] | None = None) -> str:
    """The zero-shot classification set of built-in dataset ``name`` (its test split, the
    images of the stream's eval set) at ``root/NAME-zs``, built when missing; returns the
    directory. ``classes``: only those classes (metadata "class" values), labelled 0..k-1
    in the dataset's label order, at ``root/NAME.CLS+CLS-zs``. Safe to call from several
    ranks at once (a file lock, one rename)."""
    from modx.data.builtin import ZEROSHOT, check_classes, ensure_builtin, subset_name
    from modx.data.samples import tar_samples
    from modx.data.stats import SkipStats
    from modx.data.urls import parse_sources

    if name not in ZEROSHOT:
        raise ValueError(f"no zero-shot set for built-in dataset {name!r}; choose from {sorted(ZEROSHOT)}")
    values, classnames, templates = ZEROSHOT[name]
    dirname = f"{name}-zs"
    if classes is not None:
        kept = check_classes(name, classes)
        classnames = [c for v, c in zip(values, classnames) if v in kept]
        values, dirname = kept, f"{subset_name(name, kept)}-zs"
    _, test_urls = ensure_builtin(name, root=root)
    target = os.path.join(root, dirname)
    info = {"name": name, "version": ZEROSHOT_VERSION, "test": test_urls}
    if classes is not None:
        info["classes"] = values
    with open(os.path.join(root, f".{dirname}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = os.path.join(target, "builtin.json")
        if os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == info:
                    return target
        urls = [u for s in parse_sources(test_urls) for u in s.urls]
        labelled = ((s, json.loads(s["json"])["class"]) for s in tar_samples(({"url": u} for u in urls), SkipStats()))
        samples = (
            {"__key__": s["__key__"], "png": s["png"], "cls": values.index(c)}
            for s, c in labelled if c in values
        )  # fmt: skip
        tmp = os.path.join(root, f".{dirname}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_benchmark(tmp, samples, classnames=classnames, templates=templates)
        with open(os.path.join(tmp, "builtin.json"), "w") as f:
            json.dump(info, f)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target

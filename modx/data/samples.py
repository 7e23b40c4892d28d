"""Worker-side stages: tar stream -> grouped samples -> checked, decoded samples.

Every problem is skipped and counted in a SkipStats by reason (see stats.REASONS); nothing
here raises on bad data. Shards are opened with ``webdataset.gopen`` (local paths,
``pipe:`` commands, URLs) and read with the standard library's streaming tar reader, so
that a broken tar costs only the samples after the break.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image

from modx.data.stats import SkipStats

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger("modx.data")
# Same key/extension split as webdataset: the key is everything before the first dot of
# the file name, the extension everything after it.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_samples(shards: Iterable[dict], stats: SkipStats) -> Iterator[dict]:
    """Group the members of each shard into samples ``{"__key__", "__url__", ext: bytes}``
    (``__shard__`` numbers the shards read, so a resampled shard read twice is two shards).

    A new sample starts when the key changes or an extension repeats (a duplicate key,
    left for `dedupe` to count). Unopenable shards count ``open_error``; a broken tar
    stream counts ``truncated_tar`` once and the shard's remaining members are lost.
    """
    for serial, shard in enumerate(shards):
        url = shard["url"]
        try:
            stream = wds.gopen(url)
        except Exception as exn:  # any opener failure is a skipped shard
            stats.skip("open_error")
            log.warning(f"cannot open shard {url}: {exn}")
            continue
        broken: list[Exception] = []
        try:
            yield from _group_members(stream, url, serial, broken)
        finally:
            failed = _close(stream)
        if failed is not None:  # e.g. a pipe: command that exited with an error
            stats.skip("open_error")
            log.warning(f"shard {url} failed: {failed}")
        elif broken:
            stats.skip("truncated_tar")
            log.warning(f"broken tar {url}: {broken[0]}")


def _close(stream) -> Exception | None:
    try:
        stream.close()  # a pipe: command reports its exit status here
    except Exception as exn:
        return exn
    return None


def _group_members(stream, url: str, serial: int, broken: list) -> Iterator[dict]:
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                match = _KEY_EXT.match(info.name)
                if not info.isreg() or match is None or info.name.startswith("__"):
                    continue
                key, ext = match.group(1), match.group(2).lower()
                data = tar.extractfile(info).read()
                if current is not None and (key != current["__key__"] or ext in current):
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url, "__shard__": serial}
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exn:
        broken.append(exn)  # keep what was read completely; the rest of the shard is lost
    if current is not None:
        yield current


def dedupe(samples: Iterable[dict], stats: SkipStats, per_shard: bool = True) -> Iterator[dict]:
    """Drop samples whose key was already seen (in the same shard, or in this whole pass)."""
    seen: set[str] = set()
    shard = None
    for sample in samples:
        if per_shard and sample["__shard__"] != shard:
            seen.clear()
            shard = sample["__shard__"]
        if sample["__key__"] in seen:
            stats.skip("duplicate_key")
            continue
        seen.add(sample["__key__"])
        yield sample


def every(samples: Iterable[dict], start: int, step: int) -> Iterator[dict]:
    """Keep samples start, start + step, ... (a sample-level split across ranks)."""
    for i, sample in enumerate(samples):
        if i % step == start:
            yield sample


def read_label(sample: dict) -> int | str:
    """The integer class of a sample from ``cls`` (CLIP_benchmark classification sets), or
    a reason string when it is missing or not a non-negative integer."""
    if "cls" not in sample:
        return "missing_label"
    text = sample["cls"].decode("utf-8", errors="replace").strip()
    return int(text) if text.isdigit() else "bad_label"


def read_captions(sample: dict, lines: bool = False) -> list[str] | str:
    """The captions of a sample: ``json["captions"]`` (or ``json["caption"]``), else ``txt``
    (with ``lines``, every non-blank line of ``txt`` is a caption, as in CLIP_benchmark's
    retrieval sets). Returns a reason string when there is none."""
    found_blank = False
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict):
            caps = meta.get("captions", meta.get("caption"))
            caps = [caps] if isinstance(caps, str) else caps
            if isinstance(caps, list):
                clean = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
                if clean:
                    return clean
                found_blank = found_blank or bool(caps)
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace").strip()
        if lines:
            caps = [line.strip() for line in text.splitlines() if line.strip()]
            return caps or "empty_caption"
        return [text] if text else "empty_caption"
    return "empty_caption" if found_blank else "missing_caption"


def decode_samples(
    samples: Iterable[dict],
    stats: SkipStats,
    preprocess: Callable | None,
    captions: str,
    rng: random.Random,
    max_bad_run: int | None = None,
    *,
    labels: bool = False,
    line_urls: frozenset[str] = frozenset(),
    keep_raw: bool = False,
) -> Iterator[dict]:
    """Check and decode samples into ``{"key", "image", "captions"}``, or with ``labels``
    into ``{"key", "image", "label"}`` (the class from ``KEY.cls``; captions are not read).
    ``keep_raw`` adds ``"raw"``: ``(key, image extension, image bytes, every caption)``,
    the sample as it came from the shard (what the replay buffer stores).

    ``captions``: "all" keeps every caption, "sample" picks one at random (``rng``),
    "first" the first one. ``image`` is ``preprocess(PIL RGB image)``, or the PIL image.
    An endless stream stops after ``max_bad_run`` unusable samples in a row (e.g. shards
    whose captions all sit under another extension), instead of never yielding. Samples of
    shards in ``line_urls`` hold one caption per line of ``txt``.
    """
    bad_run = 0
    for sample in samples:
        item = _decode_one(sample, stats, preprocess, labels, sample.get("__url__") in line_urls, keep_raw)
        if item is None:
            bad_run += 1
            if max_bad_run is not None and bad_run >= max_bad_run:
                log.warning("stopping: the last %d samples were all unusable", bad_run)
                return
            continue
        bad_run = 0
        if labels:
            yield item
            continue
        if captions == "sample":
            item["captions"] = [rng.choice(item["captions"])]
        elif captions == "first":
            item["captions"] = item["captions"][:1]
        yield item


def _decode_one(
    sample: dict, stats: SkipStats, preprocess: Callable | None, labels: bool, lines: bool,
    keep_raw: bool = False,
) -> dict | None:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        stats.skip("missing_image")
        return None
    target = read_label(sample) if labels else read_captions(sample, lines)
    if isinstance(target, str):
        stats.skip(target)
        return None
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = img.convert("RGB")
        if preprocess is not None:
            image = preprocess(image)
    except Exception:  # PIL raises many types for bad bytes
        stats.skip("bad_image")
        return None
    item = {"key": sample["__key__"], "image": image, "label" if labels else "captions": target}
    if keep_raw:
        item["raw"] = (sample["__key__"], ext, sample[ext], tuple(target))
    return item

"""Inputs of ``modx-shards``: CSV / TSV / JSONL tables and image folders -> shard samples."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator

from modx.data.stats import SkipStats
from modx.data.urls import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def split_of(key: str, test_fraction: float, seed: int = 0, val_fraction: float = 0.0) -> str:
    """ "train", "val" or "test" from a hash u in [0, 1) of (seed, key): test when u <
    test_fraction, val when u < test_fraction + val_fraction, else train. Deterministic and
    stable when rows are added or reordered; a val split leaves the test split as it was."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _parse_captions(value) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                return [text]
        else:
            return [text] if text else []
    if isinstance(value, list):
        return [str(c).strip() for c in value if str(c).strip()]
    return []


def read_table(path: str) -> Iterator[dict]:
    """Rows of a .csv / .tsv / .jsonl(.json lines) file as dicts."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, newline="", encoding="utf-8") as f:
        if ext in (".jsonl", ".ndjson", ".json"):
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as exn:
                        raise DataError(f"{path}:{line_no}: not a JSON object: {exn}") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{line_no}: not a JSON object")
                    yield row
        elif ext in (".csv", ".tsv"):
            yield from csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        else:
            raise DataError(f"{path}: unknown table type {ext!r}; use .csv, .tsv or .jsonl")


def table_records(path: str, image_root: str | None = None) -> Iterator[tuple[str, str, list[str]]]:
    """(key, image path, captions) of each row; image paths are relative to ``image_root``
    (default: the table's folder). Raises DataError when the columns are wrong."""
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(read_table(path)):
        if i == 0:
            cols = sorted(row)
            if "image" not in row or not ({"caption", "captions"} & set(row)):
                raise DataError(
                    f"{path}: needs columns 'image' and 'caption' (or 'captions'); found {cols}"
                )
        caps = _parse_captions(row.get("captions") or row.get("caption") or "")
        image = str(row.get("image") or "")
        key = str(row.get("key") or f"{i:09d}").replace(".", "_")
        yield key, os.path.join(root, os.path.expanduser(image)), caps


def folder_records(path: str) -> Iterator[tuple[str, str, list[str]]]:
    """(key, image path, captions) for images with a sidecar ``.txt`` (one caption a line)."""
    names = []
    for dirpath, _, files in os.walk(path):
        names.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    for i, image in enumerate(sorted(names)):
        sidecar = os.path.splitext(image)[0] + ".txt"
        caps: list[str] = []
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                caps = [line.strip() for line in f if line.strip()]
        yield f"{i:09d}", image, caps


def records_to_samples(
    records: Iterator[tuple[str, str, list[str]]], stats: SkipStats
) -> Iterator[dict]:
    """Shard samples from records; rows without an image file or caption are counted and
    skipped. The image bytes are copied as they are (no re-encoding)."""
    for key, image, caps in records:
        ext = os.path.splitext(image)[1].lower().lstrip(".")
        if not os.path.isfile(image) or "." + ext not in IMAGE_SUFFIXES:
            stats.skip("missing_image")
            continue
        if not caps:
            stats.skip("missing_caption")
            continue
        with open(image, "rb") as f:
            data = f.read()
        stats.samples += 1
        yield {"__key__": key, ext: data, "txt": caps[0], "json": {"captions": caps}}

"""Tiny shards, a fake image transform and a fake tokenizer for the modx.data tests."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from modx.data.writer import update_sizes


def png(seed: int, size: int = 8) -> bytes:
    """A small PNG whose pixels depend on ``seed``."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def good(key: str, seed: int = 0, captions: list[str] | None = None) -> dict:
    caps = captions or [f"caption of {key}", f"another caption of {key}"]
    return {"__key__": key, "png": png(seed), "txt": caps[0], "json": {"captions": caps}}


def write_tar(path: str, samples: list[dict], sizes: bool = True) -> str:
    """Write samples (several may share a key) to one tar; record its size in sizes.json."""
    with wds.TarWriter(path) as sink:
        for sample in samples:
            sink.write(sample)
    if sizes:
        update_sizes(os.path.dirname(path), {os.path.basename(path): len(samples)})
    return path


def make_shards(directory: str, prefix: str, n_shards: int, per_shard: int) -> list[str]:
    """``n_shards`` shards of ``per_shard`` good samples keyed ``PREFIX_SHARD_I``."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = [good(f"{prefix}_{s}_{i}", seed=s * 1000 + i) for i in range(per_shard)]
        paths.append(write_tar(os.path.join(directory, f"{prefix}-{s:06d}.tar"), samples))
    return paths


def truncate_inside(path: str, key: str) -> None:
    """Cut the tar in the middle of the first member of ``key`` (that sample and everything
    after it are lost; the samples before it are complete)."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + "."))
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + max(1, member.size // 2))


def fake_preprocess(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, 8, 8) float tensor."""
    arr = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """list of M strings -> (M, 6) LongTensor of character codes."""
    out = torch.zeros(len(texts), 6, dtype=torch.long)
    for i, text in enumerate(texts):
        codes = [ord(c) for c in text[:6]]
        out[i, : len(codes)] = torch.tensor(codes)
    return out

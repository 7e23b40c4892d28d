"""Embeddings of an evaluation shard set: every image and every caption, each sample once.

The loader (``modx.data.make_loader(mode="eval", captions="all")``) gives each rank and
worker its own part of the shards; the parts are gathered to every rank and sorted by
sample key, so the result does not depend on the number of ranks or workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modx.data.urls import DataError


@dataclass
class Embeddings:
    """L2-normalised float32 embeddings on the CPU, rows in sample-key order."""

    image: torch.Tensor  # (N, d)
    text: torch.Tensor  # (M, d)
    text_image_ids: torch.Tensor  # (M,) long: row in ``image`` of caption j's image
    keys: list[str]  # (N,) sample keys
    stats: dict[str, Any] = field(default_factory=dict)  # loader skip counts, all ranks


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    urls: str,
    *,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int = 64,
    workers: int = 0,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    missing_ok: bool = False,
) -> Embeddings:
    """Encode every image and every caption of the shards at ``urls``.

    With an Accelerate ``accelerator`` of several processes each rank embeds its share
    and all ranks receive the whole set. ``device`` defaults to the accelerator's, else
    the model's. The model's train/eval mode is restored afterwards. Unreadable shards
    are skipped and counted in ``stats`` (``missing_ok``: see make_loader); DataError when
    no sample at all could be read.
    """
    from modx.data import make_loader

    if accelerator is not None:
        rank, world = accelerator.process_index, accelerator.num_processes
        device = device or accelerator.device
        net = accelerator.unwrap_model(model)
    else:
        rank, world = 0, 1
        net = getattr(model, "module", model)  # DDP-wrapped
    device = torch.device(device) if device is not None else next(net.parameters()).device
    loader = make_loader(
        urls, mode="eval", batch_size=batch_size, preprocess=preprocess, tokenizer=tokenizer,
        workers=workers, rank=rank, world_size=world, captions="all", missing_ok=missing_ok,
    )  # fmt: skip
    was_training = net.training
    net.eval()
    try:
        local = _embed_local(net, loader, device, progress and rank == 0)
    finally:
        net.train(was_training)
    local["stats"] = loader.stats.as_dict()
    parts = [local]
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    return _merge(parts, urls)


def _embed_local(net: nn.Module, loader: Any, device: torch.device, progress: bool) -> dict:
    images, texts, ids, keys = [], [], [], []
    n_images = 0
    batches = loader
    if progress:
        from tqdm import tqdm

        total = loader.num_batches
        batches = tqdm(loader, total=total, desc="embed", unit="batch", leave=False)
    for batch in batches:
        img = net.encode_image(batch["image"].to(device))  # (B, d)
        txt = net.encode_text(batch["text"].to(device))  # (M, d)
        images.append(F.normalize(img.float(), dim=-1).cpu())
        texts.append(F.normalize(txt.float(), dim=-1).cpu())
        ids.append(batch["text_image_idx"] + n_images)
        keys += batch["key"]
        n_images += len(batch["key"])
    return {"image": images, "text": texts, "ids": ids, "keys": keys}


def _merge(parts: list[dict], urls: str) -> Embeddings:
    """Concatenate the ranks' parts and put images in key order (captions follow)."""
    images, texts, ids, keys = [], [], [], []
    offset = 0
    stats: dict[str, Any] = {"samples": 0, "skipped": 0, "reasons": {}}
    for part in parts:
        images += part["image"]
        texts += part["text"]
        ids += [i + offset for i in part["ids"]]
        keys += part["keys"]
        offset += len(part["keys"])
        stats["samples"] += part["stats"].get("samples", 0)
        stats["skipped"] += part["stats"].get("skipped", 0)
        for reason, n in part["stats"].get("reasons", {}).items():
            stats["reasons"][reason] = stats["reasons"].get(reason, 0) + n
    if not keys:
        raise DataError(f"no usable samples in {urls!r} (loader stats: {stats})")
    image, text, text_ids = torch.cat(images), torch.cat(texts), torch.cat(ids)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    new_row = torch.empty(len(order), dtype=torch.long)
    new_row[torch.tensor(order)] = torch.arange(len(order))
    text_ids = new_row[text_ids]  # old image row -> sorted row
    caption_order = torch.argsort(text_ids, stable=True)  # captions grouped by image, in order
    return Embeddings(
        image=image[order].contiguous(),
        text=text[caption_order].contiguous(),
        text_image_ids=text_ids[caption_order],
        keys=[keys[i] for i in order],
        stats=stats,
    )

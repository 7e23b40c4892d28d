"""Embeddings of an evaluation shard set: every image and every caption (or every image
and its class label), each sample once.

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
from modx.models.text import trim_padding, trims_padding


@dataclass
class Embeddings:
    """L2-normalised float32 embeddings on the CPU, rows in sample-key order."""

    image: torch.Tensor  # (N, d)
    text: torch.Tensor  # (M, d)
    text_image_ids: torch.Tensor  # (M,) long: row in ``image`` of caption j's image
    keys: list[str]  # (N,) sample keys
    stats: dict[str, Any] = field(default_factory=dict)  # loader skip counts, all ranks


@dataclass
class LabelledEmbeddings:
    """L2-normalised float32 image embeddings with their class labels, in sample-key order."""

    image: torch.Tensor  # (N, d)
    labels: torch.Tensor  # (N,) long
    keys: list[str]  # (N,) sample keys
    stats: dict[str, Any] = field(default_factory=dict)


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

    net, device, rank, world = placement(model, accelerator, device)
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
    return _merge(gather_parts(local, world), urls)


@torch.no_grad()
def embed_labelled(
    model: nn.Module,
    urls: str,
    *,
    preprocess: Callable,
    batch_size: int = 64,
    workers: int = 0,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> LabelledEmbeddings:
    """Encode every image of a classification set (``KEY.cls`` labels, e.g. a CLIP_benchmark
    directory) with its label; ranks, devices and modes as ``embed_dataset``."""
    from modx.data import make_loader

    net, device, rank, world = placement(model, accelerator, device)
    loader = make_loader(
        urls, mode="eval", batch_size=batch_size, preprocess=preprocess, tokenizer=None,
        workers=workers, rank=rank, world_size=world, labels=True,
    )  # fmt: skip
    was_training = net.training
    net.eval()
    images, labels, keys = [], [], []
    try:
        for batch in _bar(loader, progress and rank == 0):
            img = net.encode_image(batch["image"].to(device))  # (B, d)
            images.append(F.normalize(img.float(), dim=-1).cpu())
            labels.append(batch["label"])
            keys += batch["key"]
    finally:
        net.train(was_training)
    local = {"image": images, "labels": labels, "keys": keys, "stats": loader.stats.as_dict()}
    parts = gather_parts(local, world)
    stats = _merge_stats(parts)
    keys = [k for part in parts for k in part["keys"]]
    if not keys:
        raise ValueError(f"no usable samples in {urls!r} (loader stats: {stats})")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    image = torch.cat([x for part in parts for x in part["image"]])
    label = torch.cat([x for part in parts for x in part["labels"]])
    return LabelledEmbeddings(image[order].contiguous(), label[order], [keys[i] for i in order], stats)


def placement(model: nn.Module, accelerator: Any, device: Any) -> tuple[nn.Module, torch.device, int, int]:
    """(plain model, device, rank, world size) for an optional Accelerate accelerator."""
    if accelerator is not None:
        rank, world = accelerator.process_index, accelerator.num_processes
        device = device or accelerator.device
        net = accelerator.unwrap_model(model)
    else:
        rank, world = 0, 1
        net = getattr(model, "module", model)  # DDP-wrapped
    device = torch.device(device) if device is not None else next(net.parameters()).device
    return net, device, rank, world


def gather_parts(local: Any, world: int) -> list[Any]:
    """Every rank's `local` object, in rank order (all ranks must call it)."""
    if world == 1:
        return [local]
    from accelerate.utils import gather_object

    return gather_object([local])


def _bar(loader: Any, progress: bool) -> Any:
    if not progress:
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=loader.num_batches, desc="embed", unit="batch", leave=False)


def _embed_local(net: nn.Module, loader: Any, device: torch.device, progress: bool) -> dict:
    images, texts, ids, keys = [], [], [], []
    n_images = 0
    trim = trims_padding(net)  # captions cut to the batch's longest (exact: modx.models.text)
    for batch in _bar(loader, progress):
        img = net.encode_image(batch["image"].to(device))  # (B, d)
        txt = net.encode_text((trim_padding(batch["text"]) if trim else batch["text"]).to(device))  # (M, d)
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
    for part in parts:
        images += part["image"]
        texts += part["text"]
        ids += [i + offset for i in part["ids"]]
        keys += part["keys"]
        offset += len(part["keys"])
    stats = _merge_stats(parts)
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


def _merge_stats(parts: list[dict]) -> dict[str, Any]:
    """The loader skip counts of all ranks, added up."""
    stats: dict[str, Any] = {"samples": 0, "skipped": 0, "reasons": {}}
    for part in parts:
        stats["samples"] += part["stats"].get("samples", 0)
        stats["skipped"] += part["stats"].get("skipped", 0)
        for reason, n in part["stats"].get("reasons", {}).items():
            stats["reasons"][reason] = stats["reasons"].get(reason, 0) + n
    return stats

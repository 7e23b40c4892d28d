"""Zero-shot image classification with prompt templates, as open_clip and CLIP_benchmark do it.

The classifier (open_clip's ``build_zero_shot_classifier``): for class c, the text
embeddings of its prompts t(c) for every template t, each L2-normalised, averaged, and
the mean normalised again:

    w_c = normalize( 1/T sum_t normalize(f_text(t(c))) )          W = [w_1 ... w_C]  (d, C)

An image x is classified by the logits normalize(f_image(x)) @ W (the logit scale does not
change the ranking). Metrics in percent: top-1 and top-5 accuracy (the label among the k
highest logits, open_clip's ``accuracy``) and the mean per-class recall (CLIP_benchmark's
balanced accuracy: recall of every class that has images, averaged).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modx.models.text import trim_padding, trims_padding


@torch.no_grad()
def zeroshot_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    *,
    device: torch.device | str = "cpu",
    classes_per_batch: int = 10,
    accelerator: Any = None,
) -> torch.Tensor:
    """The (d, C) float32 zero-shot weights of ``classnames`` (CPU). String templates put
    the class name at ``{c}``; callables are called with it. Texts are encoded
    ``classes_per_batch`` classes at a time; with an Accelerate ``accelerator`` of several
    processes every rank encodes a contiguous share of the classes and all get W."""
    from modx.eval.embed import gather_parts, placement

    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    net, device, rank, world = placement(model, accelerator, device)
    start, stop = rank * len(classnames) // world, (rank + 1) * len(classnames) // world
    mine = list(classnames[start:stop])
    was_training = net.training
    net.eval()
    parts = []
    try:
        trim = trims_padding(net)  # prompts cut to the longest of a chunk (exact: modx.models.text)
        for i in range(0, len(mine), classes_per_batch):
            chunk = mine[i : i + classes_per_batch]
            texts = [_prompt(t, c) for c in chunk for t in templates]
            tokens = tokenizer(texts)
            tokens = trim_padding(tokens) if trim else tokens
            emb = F.normalize(net.encode_text(tokens.to(device)).float(), dim=-1)  # (c*T, d)
            mean = emb.reshape(len(chunk), len(templates), -1).mean(dim=1)  # (c, d)
            parts.append(F.normalize(mean, dim=-1).T.cpu())  # (d, c)
    finally:
        net.train(was_training)
    shares = gather_parts(parts, world)
    return torch.cat([w for share in shares for w in share], dim=1)  # (d, C)


def _prompt(template: str | Callable[[str], str], classname: str) -> str:
    return template.format(c=classname) if isinstance(template, str) else template(classname)


def zeroshot_metrics(
    image: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, *, chunk: int = 4096
) -> dict[str, float | int]:
    """acc1, acc5 and mean_per_class_recall (percent) of images (N, d) with labels (N,)
    under classifier weights (d, C); logits are built ``chunk`` images at a time, so
    memory stays at chunk x C whatever N. acc5 is NaN with fewer than 5 classes, as
    CLIP_benchmark reports it (top-5 of fewer classes would always hit)."""
    image = torch.as_tensor(image).float()
    labels = torch.as_tensor(labels).long()
    classifier = torch.as_tensor(classifier).float()
    n, n_classes = len(image), classifier.shape[1]
    if n == 0 or len(labels) != n:
        raise ValueError(f"need as many labels as images (>= 1), got {len(labels)} and {n}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}) (one per class name), found {labels.max().item()}")
    k5 = min(5, n_classes)
    hit1 = hit5 = 0
    per_class_hits = torch.zeros(n_classes, dtype=torch.long)
    for i in range(0, n, chunk):
        logits = image[i : i + chunk] @ classifier  # (b, C)
        y = labels[i : i + chunk]
        top = logits.topk(k5, dim=1).indices  # (b, k5), best first
        correct = top == y[:, None]  # (b, k5)
        hit1 += int(correct[:, 0].sum())
        hit5 += int(correct.any(dim=1).sum())
        per_class_hits += torch.bincount(y[correct[:, 0]], minlength=n_classes)
    support = torch.bincount(labels, minlength=n_classes)
    present = support > 0
    recall = per_class_hits[present].double() / support[present].double()
    return {
        "acc1": 100.0 * hit1 / n,
        "acc5": 100.0 * hit5 / n if n_classes >= 5 else math.nan,
        "mean_per_class_recall": 100.0 * float(recall.mean()),
        "n_images": n,
        "n_classes": n_classes,
    }


def json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` for strict JSON, as modx writes it: an undefined value (NaN: acc5 with
    fewer than 5 classes) becomes None (null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def evaluate_zeroshot(
    model: nn.Module,
    root: str,
    *,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int = 64,
    workers: int = 0,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Zero-shot metrics of ``model`` on a CLIP_benchmark classification directory.

    Every rank encodes its share of the classes and of the images; the metrics are
    computed once, on rank 0 (the other ranks return None). Returns ``zeroshot_metrics``
    plus the loader's skip counts under ``stats``.
    """
    from modx.data.benchmark import read_benchmark
    from modx.eval.embed import embed_labelled, placement

    bench = read_benchmark(root)
    if bench.kind != "classification":
        raise ValueError(f"{root} is a {bench.kind} set (dataset_type.txt), not a zero-shot classification set")
    _, device, rank, _ = placement(model, accelerator, device)
    weights = zeroshot_classifier(
        model, tokenizer, bench.classnames, bench.templates, device=device, accelerator=accelerator
    )
    emb = embed_labelled(
        model, root, preprocess=preprocess, batch_size=batch_size, workers=workers,
        accelerator=accelerator, device=device, progress=progress,
    )  # fmt: skip
    if rank != 0:
        return None
    return {**zeroshot_metrics(emb.image, emb.labels, weights), "stats": emb.stats}

"""Losses: the CLIP contrastive loss over the global batch and the Mod-X KL term.

Read like open_clip's ``loss.py``: the distributed gather is a plain function,
each loss is one small class or function with its formula visible in the code.

Multi-process semantics. ``gather_features`` all-gathers the per-rank features
and keeps the autograd path to the local shard; its backward *sums* the
gradient that every rank computed for this rank's rows. Every rank then
computes the same loss L over the global batch, and after the usual gradient
averaging of data-parallel training (DDP / Accelerate) each parameter receives
exactly dL/dtheta of the one-process run with the global batch.

Local loss (``train.local_loss``, as open_clip's ``--local-loss``). Instead of the
full B x B matrices, rank r scores only its own b rows against the gathered B
columns, in both directions (its images' i2t rows, its texts' t2i rows): O(b x B)
memory. Each rank's value is scaled so that the MEAN over ranks is the global
loss; with the summed gather backward and the data-parallel gradient averaging,
every parameter again receives exactly dL/dtheta of the global computation.
The values on different ranks differ (each covers its rows); their mean is L.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClipLoss",
    "all_gather",
    "clip_loss",
    "clip_loss_local",
    "full_precision",
    "gather_features",
    "modx_kl",
    "modx_kl_local",
    "world_info",
]


def full_precision(*tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """A block where autocast is off for the tensors' device, so that a loss computed on
    ``.float()`` inputs stays float32 (autocast would run its matmuls in bf16/fp16 again)."""
    types = {t.device.type for t in tensors if isinstance(t, torch.Tensor)} or {"cpu"}
    stack = contextlib.ExitStack()
    for device_type in types:
        if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (world * b, ...) without gradient; identity on one process."""
    return x if world_info()[1] == 1 else _all_gather_no_grad(x)


def _all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, world = world_info()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of all ranks for the local rows.

    Equivalent to ``torch.distributed.nn.all_gather`` but built on all_reduce,
    which every backend (gloo included) supports.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: (b, d) -> (world * b, d)
        ctx.rank, ctx.batch = world_info()[0], x.shape[0]
        return _all_gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch]


def gather_features(
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather image and text features across ranks: (b, d) -> (world * b, d).

    Identity on one process. With ``gather_with_grad`` the local rows keep their
    gradient and the backward sums every rank's contribution (see module doc);
    without it the result is detached (for frozen old-model features).
    All ranks must pass the same local batch size.
    """
    _, world = world_info()
    if world == 1:
        return image, text
    if gather_with_grad:
        return _AllGatherWithGrad.apply(image), _AllGatherWithGrad.apply(text)
    return _all_gather_no_grad(image), _all_gather_no_grad(text)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021): (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2.

    Features are expected L2-normalised, ``logit_scale`` already exponentiated.
    Computed in float32 (float64 stays float64) with autocast off, whatever the caller's.
    """
    with full_precision(image_features):
        image_features, text_features = _at_least_fp32(image_features), _at_least_fp32(text_features)
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = _at_least_fp32(logit_scale)
        logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def clip_loss_local(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor | float,
    rank: int,
) -> torch.Tensor:
    """This rank's share of the symmetric InfoNCE: its b rows against the B gathered columns.

        CE(s I_r T^T, r*b + i) over its images, CE(s T_r I^T, r*b + i) over its texts  # (b, B)

    The mean over its rows equals ``clip_loss`` of the global batch when averaged over
    ranks (ranks hold equal b). float32 with autocast off, as ``clip_loss``.
    """
    with full_precision(image_local):
        image_local, text_local = _at_least_fp32(image_local), _at_least_fp32(text_local)
        image_all, text_all = _at_least_fp32(image_all), _at_least_fp32(text_all)
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = _at_least_fp32(logit_scale)
        logits_per_image = logit_scale * image_local @ text_all.T  # (b, B)
        logits_per_text = logit_scale * text_local @ image_all.T  # (b, B)
        b = image_local.shape[0]
        labels = torch.arange(rank * b, (rank + 1) * b, device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class ClipLoss(nn.Module):
    """CLIP loss over the *global* batch: gather (with grad), then ``clip_loss``.

    N processes with local batch b compute the same value, and (after gradient
    averaging) the same parameter gradients, as one process with batch N * b.

    With ``local_loss`` each rank scores only its rows against the gathered columns
    (``clip_loss_local``): O(b x B) memory, the same gradients (see module doc).
    """

    def __init__(self, gather_with_grad: bool = True, local_loss: bool = False) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        loss, _, _ = global_clip_loss(image_features, text_features, logit_scale,
                                      local_loss=self.local_loss, gather_with_grad=self.gather_with_grad)
        return loss


def global_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLIP loss over the global batch, gathered image features, gathered text features):
    what ``ClipLoss`` computes, with the (B, d) features strategies reuse for their own
    terms. ``local_loss``: this rank's rows against the gathered columns."""
    image_all, text_all = gather_features(image_features, text_features, gather_with_grad=gather_with_grad)
    rank, world = world_info()
    if local_loss and world > 1:
        loss = clip_loss_local(image_features, text_features, image_all, text_all, logit_scale, rank)
    else:
        loss = clip_loss(image_all, text_all, logit_scale)
    return loss, image_all, text_all


def _row_kl(old_logits: torch.Tensor, new_logits: torch.Tensor, diagonal: bool = True) -> torch.Tensor:
    """KL(softmax(old_i) || softmax(new_i)) of every row i: (B,). Without the diagonal,
    both rows are distributions over the other samples (j != i)."""
    if not diagonal:  # (B, B) -> (B, B - 1): row i without column i
        n = old_logits.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=old_logits.device)
        old_logits, new_logits = old_logits[off].view(n, n - 1), new_logits[off].view(n, n - 1)
    log_p_old = F.log_softmax(old_logits, dim=-1)  # (B, B)
    log_p_new = F.log_softmax(new_logits, dim=-1)  # (B, B)
    return (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=-1)  # (B,)


def _cognition_align(old_sim: torch.Tensor, new_sim: torch.Tensor) -> torch.Tensor:
    """Mod-X selective alignment: rows where the old model's argmax is not the
    diagonal are replaced by the new model's (detached) rows, so they add nothing."""
    eye = torch.arange(old_sim.shape[0], device=old_sim.device)
    wrong = old_sim.argmax(dim=1) != eye  # (B,)
    return torch.where(wrong[:, None], new_sim.detach(), old_sim)


def modx_kl(
    img_new: torch.Tensor,
    txt_new: torch.Tensor,
    img_old: torch.Tensor,
    txt_old: torch.Tensor,
    temperature: float = 1.0,
    cognition_align: bool = True,
    reduction: str = "sum",
    diagonal: bool = True,
) -> torch.Tensor:
    """Mod-X off-diagonal alignment term (Ni et al. 2023, PAPERS.md section 1).

    S = I T^T and S_o = I_o T_o^T from L2-normalised features; with
    cognition alignment, old rows whose argmax is off the diagonal become the
    new (detached) rows, for i2t (rows of S_o) and t2i (rows of S_o^T) apart.

        KL_i2t = sum_i KL(softmax(S_o[i] / tau) || softmax(S[i] / tau))
        KL_t2i = the same over the rows of S_o^T and S^T
        return (KL_i2t + KL_t2i) / 2

    ``reduction="sum"`` sums over the batch rows (the reference script);
    ``"mean"`` averages them. ``diagonal=False`` (a modx option, not the paper's) compares
    each row's distribution over the *other* samples only, so the KL leaves the matched
    pair's similarity to the CLIP loss. Computed in float32 whatever the input dtype.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    with full_precision(img_new, img_old):
        img_new, txt_new = F.normalize(img_new.float(), dim=-1), F.normalize(txt_new.float(), dim=-1)
        img_old = F.normalize(img_old.detach().float(), dim=-1)
        txt_old = F.normalize(txt_old.detach().float(), dim=-1)

        sim_new = img_new @ txt_new.T  # (B, B), rows: image -> texts
        sim_old = img_old @ txt_old.T  # (B, B)
        old_i2t, old_t2i = sim_old, sim_old.T
        if cognition_align:
            old_i2t = _cognition_align(old_i2t, sim_new)
            old_t2i = _cognition_align(old_t2i, sim_new.T)
        kl_i2t = _row_kl(old_i2t / temperature, sim_new / temperature, diagonal)  # (B,)
        kl_t2i = _row_kl(old_t2i / temperature, sim_new.T / temperature, diagonal)  # (B,)
        kl = (kl_i2t + kl_t2i) / 2
        return kl.sum() if reduction == "sum" else kl.mean()


def modx_kl_rows(
    old_rows: torch.Tensor,
    new_rows: torch.Tensor,
    diag: torch.Tensor,
    temperature: float = 1.0,
    cognition_align: bool = True,
) -> torch.Tensor:
    """Per-row Mod-X KL of some rows of a similarity matrix against all its columns.

        KL_i = KL(softmax(S_o[i] / tau) || softmax(S[i] / tau))        # (rows,)

    ``old_rows``, ``new_rows``: (rows, B) cosine similarities; ``diag[i]`` is the column
    of row i's own pair. With cognition alignment a row whose old argmax is not
    ``diag[i]`` becomes the new (detached) row, so it adds nothing (PAPERS.md section 1).
    """
    if cognition_align:
        wrong = old_rows.argmax(dim=1) != diag  # (rows,)
        old_rows = torch.where(wrong[:, None], new_rows.detach(), old_rows)
    log_p_old = F.log_softmax(old_rows / temperature, dim=-1)  # (rows, B)
    log_p_new = F.log_softmax(new_rows / temperature, dim=-1)  # (rows, B)
    return (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=-1)


def modx_kl_local(
    img_new: torch.Tensor,
    txt_new: torch.Tensor,
    img_old: torch.Tensor,
    txt_old: torch.Tensor,
    rank: int,
    world: int,
    temperature: float = 1.0,
    cognition_align: bool = True,
    reduction: str = "sum",
) -> torch.Tensor:
    """This rank's share of ``modx_kl`` over the gathered global batch, in O(b x B) memory.

    All four inputs are the GATHERED (B, d) features (the new ones gathered with grad);
    rank r owns the i2t rows of its images and the t2i rows of its texts, rows
    r*b .. (r+1)*b - 1 of S = I T^T and of S^T, scored against all B columns:

        share_r = sum_{i in r} (KL_i2t[i] + KL_t2i[i]) / 2       (/ B for "mean")
        return world * share_r        # the mean over ranks is modx_kl's global value

    The cognition-alignment argmax of each row is taken over the old model's full row,
    as in the global computation. On one process (rank 0, world 1) it equals ``modx_kl``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    total = img_new.shape[0]
    if total % world:
        raise ValueError(f"the gathered batch ({total}) does not split over {world} ranks")
    b = total // world
    own = slice(rank * b, (rank + 1) * b)
    with full_precision(img_new, img_old):
        img_new, txt_new = F.normalize(img_new.float(), dim=-1), F.normalize(txt_new.float(), dim=-1)
        img_old = F.normalize(img_old.detach().float(), dim=-1)
        txt_old = F.normalize(txt_old.detach().float(), dim=-1)
        diag = torch.arange(rank * b, (rank + 1) * b, device=img_new.device)

        i2t_new, i2t_old = img_new[own] @ txt_new.T, img_old[own] @ txt_old.T  # (b, B)
        t2i_new, t2i_old = txt_new[own] @ img_new.T, txt_old[own] @ img_old.T  # (b, B)
        kl_i2t = modx_kl_rows(i2t_old, i2t_new, diag, temperature, cognition_align)  # (b,)
        kl_t2i = modx_kl_rows(t2i_old, t2i_new, diag, temperature, cognition_align)  # (b,)
        share = (kl_i2t.sum() + kl_t2i.sum()) / 2
        return world * (share if reduction == "sum" else share / total)

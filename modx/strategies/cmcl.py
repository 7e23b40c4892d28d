"""CMCL (Liu et al., NeurIPS 2025, "Continual Multimodal Contrastive Learning"): dual-sided
null-space projection (DNS) of the gradients of the towers' linear heads, as the authors'
code does it (Xiaohao-Liu/CMCL, `cmcl/dns.py`).

Each tower ends in a linear head, y = x P with P (width, d) (`visual.proj`,
`text_projection`). The contrastive score of a pair is (x_img P_img) . (x_txt P_txt), so an
update G of P_img leaves the scores of earlier pairs alone when x_img G y_txt = 0 for their
image inputs x_img and the other modality's projected features y_txt = x_txt P_txt. At each
phase end the statistics of both sides are added (running means over every sample so far):

    C_in[img]  = mean x^ x^T              over the image head's inputs, unit-normalised
    C_out[img] = P_txt^T C_in_new[txt] P_txt   the text features in the joint space (P_txt at
                                               the phase end), and the same with img / txt swapped

and during every later phase each head's synced gradient is projected (`dns_project`):

    G <- G - P_in G P_out,   P_in = projector(C_in, cmcl_lambda_min),
                             P_out = projector(C_out, cmcl_lambda_min_out)

(`subspace_projector`: the span of the singular vectors whose singular value exceeds the
threshold). The authors train only these heads on frozen encoders' features; so does
`strategy.cmcl_train: heads` (default); `all` trains every parameter and projects the heads'.
Statistics are sums over the global batch (reduced over processes): the same on every process.

Sharded (FSDP): a head's gradient is gathered whole (P_in mixes its rows), projected, and each
process keeps its rows; the statistics are collected with a whole copy of the model on every
process (as evaluation does: the heads are swapped for identities, which a sharded model's
managed parameters do not allow), each embedding its share of the batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from modx.config import ConfigError
from modx.strategies.base import Batch, Strategy, local, shard_rows

SIDES = ("image", "text")


def subspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """CMCL's projector onto the feature subspace of earlier phases (the authors'
    `get_projector`): U_k U_k^T, U_k the left singular vectors of the (n, n) covariance whose
    singular value exceeds `threshold`. (n, n) float64."""
    u, s, _ = torch.linalg.svd(cov.double())
    u = u[:, s > threshold]  # (n, k)
    return u @ u.T


def dns_project(grad: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """CMCL's dual-sided null-space projection of the gradient of a head y = x P, P (n_in, n_out):

        G' = G - P_in G P_out          so that  P_in G' P_out = 0

    (the authors' `grad - P_1_ @ grad @ P_1` for their (out, in) weight W = P^T). An update
    along G' leaves x G' y = 0 for x in the span of P_in and y in that of P_out."""
    return grad - p_in @ grad @ p_out


def running_covariance(cov: torch.Tensor, n: int, xtx: torch.Tensor, m: int) -> torch.Tensor:
    """The mean of x x^T over n + m samples from the mean over the first n (`cov`) and the
    sum over the m new ones (`xtx`): cov n / (n + m) + xtx / (n + m), as the authors'
    `update_covariance`."""
    return cov * (n / (n + m)) + xtx / (n + m)


def heads(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The (owner module, attribute) of each tower's linear head, a (width, d) matrix the
    pooled features are multiplied by: `visual.proj`, and `text_projection` of the model
    (open_clip CLIP) or of its text tower (CustomTextCLIP, modx towers)."""
    text_owner = model if getattr(model, "text_projection", None) is not None else getattr(model, "text", None)
    found = {"image": (getattr(model, "visual", None), "proj"), "text": (text_owner, "text_projection")}
    for side, (owner, attr) in found.items():
        head = getattr(owner, attr, None) if owner is not None else None
        if not (isinstance(head, nn.Parameter) and head.ndim == 2):
            raise ConfigError("strategy.name", f"cmcl projects the gradients of the towers' linear heads "
                              f"(visual.proj, text_projection); this model's {side} tower has none (only open_clip "
                              "transformer towers and modx towers have): choose another strategy or model")
    return found


def head_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {side: getattr(owner, attr) for side, (owner, attr) in heads(model).items()}


@contextlib.contextmanager
def identity_heads(model: nn.Module) -> Iterator[None]:
    """Within the block the heads are identity matrices: encode_image / encode_text return
    the pooled features the heads read. The head parameters are put back as they were."""
    saved = heads(model)
    originals = {side: getattr(owner, attr) for side, (owner, attr) in saved.items()}
    try:
        for side, (owner, attr) in saved.items():
            w = originals[side]
            setattr(owner, attr, nn.Parameter(torch.eye(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False))
        yield
    finally:
        for side, (owner, attr) in saved.items():
            setattr(owner, attr, originals[side])


class CMCL(Strategy):
    name = "cmcl"

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0  # the statistics of every phase are state of its own (and `heads` freezes the towers)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen = 0  # samples in the statistics
        self.stats: dict[str, torch.Tensor] = {}  # in_image, in_text, out_image, out_text: float64, CPU
        self.projectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # side -> (P_in, P_out) this phase

    def prepare_model(self, model: nn.Module) -> nn.Module:
        weights = head_weights(model)
        if self.cfg.cmcl_train == "heads":  # the authors' setting: frozen encoders, trained heads
            model.requires_grad_(False)
            for w in weights.values():
                w.requires_grad_(True)
        return model

    def begin_phase(self, phase: int, model: nn.Module, old_model: nn.Module | None) -> None:
        """The projectors of this phase, from the statistics of the earlier ones (none in the first)."""
        self.projectors = {}
        if not self.seen:
            return
        device = self.accelerator.device
        for side in SIDES:
            p_in = subspace_projector(self.stats[f"in_{side}"], self.cfg.cmcl_lambda_min)
            p_out = subspace_projector(self.stats[f"out_{side}"], self.cfg.cmcl_lambda_min_out)
            self.projectors[side] = (p_in.float().to(device), p_out.float().to(device))

    def before_step(self, model: nn.Module) -> None:
        if not self.projectors:
            return
        for side, w in head_weights(self.accelerator.unwrap_model(model)).items():
            if w.grad is not None:
                p_in, p_out = self.projectors[side]
                grad = w.grad.full_tensor() if isinstance(w.grad, DTensor) else w.grad  # (width, d), whole
                local(w.grad).copy_(dns_project(grad.float(), p_in, p_out)[shard_rows(w.grad)])

    @torch.no_grad()
    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        net = self.accelerator.unwrap_model(model)
        if self.sharded:
            net = self.context.plain_copy(net)  # collective; freed on return
        weights = {side: w.detach().float() for side, w in head_weights(net).items()}  # (width, d), the phase's end
        xtx = {side: torch.zeros(w.shape[0], w.shape[0], device=w.device) for side, w in weights.items()}
        m = torch.zeros(1, device=self.accelerator.device)
        was_training = net.training
        net.eval()
        with identity_heads(net), self.accelerator.autocast():
            for batch in islice(batches, self.cfg.cmcl_batches):
                pooled = {"image": net.encode_image(batch["image"]), "text": net.encode_text(batch["text"])}
                for side, x in pooled.items():
                    x = F.normalize(x.float(), dim=-1)  # (b, width), unit norm as the authors' inputs
                    xtx[side] += x.T @ x
                m += batch["image"].shape[0]
                self.old_samples += batch["image"].shape[0]  # forward only, of the model that becomes the old one
        net.train(was_training)
        for side in SIDES:  # sums over the global batch: the same statistics on every process
            xtx[side] = self.accelerator.reduce(xtx[side], reduction="sum")
        m = int(self.accelerator.reduce(m, reduction="sum").item())
        if m == 0:
            return
        other = {"image": "text", "text": "image"}
        new = {}
        for side in SIDES:
            w = weights[other[side]]
            new[f"in_{side}"] = xtx[side]
            new[f"out_{side}"] = w.T @ xtx[other[side]] @ w  # (d, d): the other modality in the joint space
        for key, value in new.items():
            value = value.double().cpu()
            self.stats[key] = running_covariance(self.stats.get(key, torch.zeros_like(value)), self.seen, value, m)
        self.seen += m

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "stats": self.stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state.get("seen", 0)
        self.stats = {k: v.double().cpu() for k, v in state.get("stats", {}).items()}

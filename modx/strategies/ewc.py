"""EWC (Kirkpatrick et al., 2017): a quadratic penalty anchoring parameters the earlier
phases found important, weighted by a diagonal Fisher estimate.

At each phase end, F_phase[p] = mean over `ewc_batches` batches of (d CLIP loss / d p)^2
(averaged over processes), normalised to mean 1 so that `ewc_lambda` does not depend on the
model size; F accumulates over phases and the anchor theta* is the model that ended the
latest phase. Penalty = ewc_lambda / 2 * mean_p F[p] (p - theta*[p])^2.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

from modx.strategies.base import Batch, Strategy


class EWC(Strategy):
    name = "ewc"

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0  # its Fisher of every phase is state of its own

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        clip, logs = super().loss(model, batch, old_model)
        if not self.fisher:
            return clip, logs
        penalty = self.penalty(self.accelerator.unwrap_model(model))
        logs["loss_ewc"] = penalty.detach()
        return clip + self.cfg.ewc_lambda / 2 * penalty, logs

    def penalty(self, model: nn.Module) -> torch.Tensor:
        terms, count = [], 0
        for name, p in model.named_parameters():
            if name in self.fisher:
                terms.append((self.fisher[name] * (p - self.anchor[name]) ** 2).sum())
                count += p.numel()
        return torch.stack(terms).sum() / count

    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        net = self.accelerator.unwrap_model(model)
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        n_batches = 0
        for batch in islice(batches, self.cfg.ewc_batches):
            model.zero_grad(set_to_none=True)
            with self.accelerator.no_sync(model), self.accelerator.autocast():  # local gradients
                out = model(batch["image"], batch["text"])
                loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
                loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            n_batches += 1
            self.extra_samples += batch["image"].shape[0]
        model.zero_grad(set_to_none=True)
        flat = torch.cat([f.flatten() for f in fisher.values()]) / max(n_batches, 1)
        flat = self.accelerator.reduce(flat, reduction="mean")
        flat = flat / flat.mean().clamp_min(1e-30)
        offset = 0
        for n, p in params.items():
            f = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            self.fisher[n] = self.fisher[n] + f if n in self.fisher else f
            self.anchor[n] = p.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.accelerator.device  # checkpoints hold CPU tensors
        self.fisher = {n: f.to(device) for n, f in state.get("fisher", {}).items()}
        self.anchor = {n: a.to(device) for n, a in state.get("anchor", {}).items()}

"""EWC (Kirkpatrick et al., 2017): a quadratic penalty anchoring parameters the earlier
phases found important, weighted by a diagonal Fisher estimate.

At each phase end, F_phase[p] = mean over `ewc_batches` batches of (d CLIP loss / d p)^2
(averaged over processes), normalised to mean 1 so that `ewc_lambda` does not depend on the
model size; F accumulates over phases and the anchor theta* is the model that ended the
latest phase. Penalty = ewc_lambda / 2 * mean_p F[p] (p - theta*[p])^2.

Sharded (FSDP): F and theta* are kept as each process's shards. The gradients FSDP gives are
those of the GLOBAL batch (reduce-scattered), so F is the Fisher estimate of one process with
the global batch (with DDP it is the mean over processes of their local batches' estimates:
the two agree on one process). The penalty's gradient, lambda F (p - theta*) / n, is added
to the sharded gradients before the optimiser step (`before_step`), and its value to the
loss (no autograd through the sharded parameters outside the forward).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from modx.config import ConfigError
from modx.strategies.base import Batch, Strategy, local


class EWC(Strategy):
    name = "ewc"

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0  # its Fisher of every phase is state of its own

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.count: int | None = None  # sharded: elements the penalty covers (its mean's denominator)

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        net = self.accelerator.unwrap_model(model)
        if self.fisher and sharded(net):  # its value (the gradient comes in before_step)
            with torch.no_grad():
                penalty = self.sharded_penalty(net)  # before the forward: every parameter is sharded
            clip, logs = super().loss(model, batch, old_model)
            logs["loss_ewc"] = penalty
            return clip + self.cfg.ewc_lambda / 2 * penalty, logs
        clip, logs = super().loss(model, batch, old_model)
        if not self.fisher:
            return clip, logs
        penalty = self.penalty(net)
        logs["loss_ewc"] = penalty.detach()
        return clip + self.cfg.ewc_lambda / 2 * penalty, logs

    def penalty(self, model: nn.Module) -> torch.Tensor:
        terms, count = [], 0
        for name, p in model.named_parameters():
            if name in self.fisher:
                terms.append((self.fisher[name] * (p - self.anchor[name]) ** 2).sum())
                count += p.numel()
        return torch.stack(terms).sum() / count

    def sharded_penalty(self, model: nn.Module) -> torch.Tensor:
        """`penalty` of a sharded model from the local shards (collective): 0-d tensor."""
        device = self.accelerator.device  # collectives on the device (NCCL has no CPU tensors)
        parts, whole = torch.zeros((), device=device), torch.zeros((), device=device)
        for name, p in model.named_parameters():
            if name in self.fisher:
                term = (self.fisher[name] * (local(p).detach() - self.anchor[name]) ** 2).sum().to(device)
                parts, whole = (parts + term, whole) if isinstance(p, DTensor) else (parts, whole + term)
        dist.all_reduce(parts, op=dist.ReduceOp.SUM)
        return (parts + whole) / self.count

    def before_step(self, model: nn.Module) -> None:
        """Sharded: add the penalty's gradient lambda F (p - theta*) / n to every shard's."""
        net = self.accelerator.unwrap_model(model)
        if not (self.fisher and sharded(net)):
            return
        for name, p in net.named_parameters():
            if name in self.fisher and p.grad is not None:
                grad = self.cfg.ewc_lambda * self.fisher[name] * (local(p).detach() - self.anchor[name]) / self.count
                local(p.grad).add_(grad.to(local(p.grad).dtype))

    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        net = self.accelerator.unwrap_model(model)
        if sharded(net):
            self.sharded_fisher(model, net, batches)
            return
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

    def sharded_fisher(self, model: nn.Module, net: nn.Module, batches: Iterable[Batch]) -> None:
        """end_phase of a sharded model: F from the (global-batch) sharded gradients, kept
        as local shards; its mean over every element is 1 (collective)."""
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(local(p)) for n, p in params.items()}
        n_batches = 0
        for batch in islice(batches, self.cfg.ewc_batches):
            model.zero_grad(set_to_none=True)
            with self.accelerator.autocast():
                out = model(batch["image"], batch["text"])
                loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            for n, p in params.items():
                if p.grad is None:
                    continue
                grad = local(p.grad).detach().float()
                if not isinstance(p.grad, DTensor):  # replicated (the logit scale): the global batch's
                    grad = self.accelerator.reduce(grad.clone(), reduction="mean")
                fisher[n] += grad**2
            n_batches += 1
            self.extra_samples += batch["image"].shape[0]
        model.zero_grad(set_to_none=True)
        device = self.accelerator.device  # collectives on the device (NCCL has no CPU tensors)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum and count of the sharded elements
        whole = torch.zeros(2, dtype=torch.float64, device=device)  # the replicated ones (float64: exact counts)
        for n, p in params.items():
            f = fisher[n] / max(n_batches, 1)
            fisher[n] = f
            target = total if isinstance(p, DTensor) else whole
            target += torch.stack([f.sum().to(device, torch.float64), torch.tensor(float(f.numel()), device=device, dtype=torch.float64)])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mean = ((total[0] + whole[0]) / (total[1] + whole[1])).clamp_min(1e-30)
        self.count = int(total[1] + whole[1])
        for n, p in params.items():
            f = fisher[n] / mean.to(fisher[n].device, fisher[n].dtype)
            self.fisher[n] = self.fisher[n] + f if n in self.fisher else f
            self.anchor[n] = local(p).detach().clone()

    def state_dict(self) -> dict[str, Any]:
        state = {"fisher": self.fisher, "anchor": self.anchor}
        if self.count is not None:  # sharded: local shards, of this many processes
            state.update(count=self.count, world_size=self.context.world_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.accelerator.device  # checkpoints hold CPU tensors
        saved = state.get("world_size")
        if saved is not None and saved != self.context.world_size:
            raise ConfigError("strategy.name", f"this EWC state holds the Fisher and anchors sharded over {saved} "
                              f"processes; resume it with {saved} processes")
        self.fisher = {n: f.to(device) for n, f in state.get("fisher", {}).items()}
        self.anchor = {n: a.to(device) for n, a in state.get("anchor", {}).items()}
        self.count = state.get("count")


def sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are sharded (FSDP: DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())

"""Sharded training with torch's FSDP2 (`fully_shard`), CPU (gloo) and GPU alike.

    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 train_modx.py ...

Accelerate marks an FSDP launch in the environment (ACCELERATE_USE_FSDP, FSDP_*), but on a
machine without a GPU its state stays MULTI_CPU, and its own FSDP2 preparation refuses the
0-d `logit_scale` ("fully_shard doesn't support scalar parameters"). So modx shards the model
itself, the same way on every device:

    every block of a tower's `resblocks` but the last   its own unit
    each tower (`visual`, `text`)                       its own unit (with its last block:
                                                        modx.models.pooled calls that block's
                                                        parts directly, outside its forward)
    the root                                            the rest; 0-d parameters and those
                                                        of modules marked `modx_replicated`
                                                        (run outside the forward: C-CLIP's
                                                        predictor) are left out (replicated)
                                                        and their gradients averaged over
                                                        processes by hand

`reshard_after_forward` is True for FULL_SHARD and False for SHARD_GRAD_OP (Accelerate's
FSDP_RESHARD_AFTER_FORWARD). `encode_image` / `encode_text` of the root are registered as
FSDP forward methods, so they gather the root's parameters like `forward` does. Frozen
copies (the old model of Mod-X) are sharded like the student: built on the meta device from a
template of the bare model, sharded, then given their local shards (never a full copy).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.amp.grad_scaler import OptState
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from modx.strategies.base import local


class ShardingError(RuntimeError):
    """An FSDP launch modx cannot run as asked; the message says what to change."""


def requested(environ: Mapping[str, str] = os.environ) -> str | None:
    """"FULL_SHARD" or "SHARD_GRAD_OP" when the launch asks for FSDP (`accelerate launch
    --use_fsdp`, or a config file with distributed_type FSDP), else None."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ShardingError(f"FSDP version {version} was asked for; modx trains with FSDP2 only: "
                            "pass --fsdp_version 2 (or fsdp_version: 2 in the Accelerate config)")
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", environ.get("FSDP_SHARDING_STRATEGY", "true")).upper()
    if reshard in ("TRUE", "FULL_SHARD", "1"):
        return "FULL_SHARD"
    if reshard in ("FALSE", "SHARD_GRAD_OP", "0"):
        return "SHARD_GRAD_OP"
    raise ShardingError(f"FSDP_RESHARD_AFTER_FORWARD={reshard}: modx shards with FULL_SHARD (true) or "
                        "SHARD_GRAD_OP (false) only")


@dataclass
class Sharding:
    """How a run shards its models; `template` is the bare model on the meta device."""

    strategy: str  # FULL_SHARD | SHARD_GRAD_OP
    mesh: DeviceMesh
    device: torch.device
    template: nn.Module | None = None

    @classmethod
    def create(cls, strategy: str, device: torch.device) -> Sharding:
        if not (dist.is_available() and dist.is_initialized()):
            raise ShardingError("FSDP was asked for but no process group is running: launch with "
                                "`accelerate launch --num_processes N --use_fsdp --fsdp_version 2`")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return cls(strategy, mesh, device)

    def shard(self, model: nn.Module, reshard_after_forward: bool | None = None) -> nn.Module:
        """Shard `model` (a bare model on the device) in place; returns it. The first call
        keeps a meta-device template of it for `frozen_copy` and `plain_copy`."""
        if self.template is None:
            self.template = meta_copy(model)
        if reshard_after_forward is None:
            reshard_after_forward = self.strategy == "FULL_SHARD"
        options = {"mesh": self.mesh, "reshard_after_forward": reshard_after_forward}
        for name, module in model.named_modules():
            if name.endswith("resblocks") and isinstance(module, nn.ModuleList):
                for block in list(module)[:-1]:
                    fully_shard(block, **options)
        for tower in ("visual", "text"):
            if isinstance(getattr(model, tower, None), nn.Module):
                fully_shard(getattr(model, tower), **options)
        replicated = {p for p in model.parameters() if p.ndim == 0}
        replicated |= {p for m in model.modules() if getattr(m, "modx_replicated", False) for p in m.parameters()}
        fully_shard(model, ignored_params=replicated, **options)
        for method in ("encode_image", "encode_text"):
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)
        return model

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """The old model: sharded like `model`, its local shards copied from `model`'s (no
        full copy on any process), eval mode, no gradients; its forward reshards after
        itself (it has no backward)."""
        old = self.shard(self._empty(), reshard_after_forward=True)
        with torch.no_grad():
            for target, source in zip(_tensors(old), _tensors(model), strict=True):
                local(target).copy_(local(source))
        return old.eval().requires_grad_(False)

    def frozen(self, model: nn.Module) -> nn.Module:
        """A bare model (e.g. an export read back on resume) sharded and frozen."""
        return self.shard(model.to(self.device), reshard_after_forward=True).eval().requires_grad_(False)

    def plain_copy(self, model: nn.Module) -> nn.Module:
        """An unsharded copy of `model` on every process (collective), for evaluation: each
        process embeds its share of an eval set without collectives in every forward."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = self._empty()
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            plain.load_state_dict(state, strict=False)
            for name, b in plain.named_buffers():  # non-persistent buffers are not in the state
                b.copy_(buffers[name])
        plain.train(model.training)
        return plain

    def _empty(self) -> nn.Module:
        empty = copy.deepcopy(self.template)
        return empty.to_empty(device=self.device)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose tensors are on the meta device (no storage; the weights are
    never copied, not even for a moment)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in module order (the same for two models built alike)."""
    return [*model.parameters(), *model.buffers()]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def split_groups(groups: list[dict]) -> list[dict]:
    """The optimiser's parameter groups with each group's replicated (plain) parameters in a
    group of their own beside its sharded ones: the fused AdamW kernel refuses a list that
    mixes DTensors with plain tensors of more than 0 dimensions (C-CLIP's predictor). Its
    update is elementwise, so splitting changes no number."""
    split = []
    for group in groups:
        sharded = [p for p in group["params"] if isinstance(p, DTensor)]
        replicated = [p for p in group["params"] if not isinstance(p, DTensor)]
        for params, suffix in ((sharded, ""), (replicated, "/replicated")):
            if params:
                split.append({**group, "params": params, "name": f"{group.get('name', 'group')}{suffix}"})
    return split


def sync_replicated_grads(model: nn.Module) -> None:
    """Average over processes the gradients of the parameters FSDP leaves replicated (0-d:
    the logit scale), as DDP averages every gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def grad_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients, sharded or replicated (collective): 0-d tensor."""
    sharded = torch.zeros((), device=parameters[0].device if parameters else "cpu")
    replicated = torch.zeros_like(sharded)
    for p in parameters:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sharded = sharded + p.grad.to_local().float().pow(2).sum()
        else:
            replicated = replicated + p.grad.float().pow(2).sum()
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    return (sharded + replicated).sqrt()


class GradScaler(torch.amp.GradScaler):
    """torch's GradScaler (fp16) for a sharded model, whose gradients are DTensors beside plain
    replicated ones (0-d logit scale, C-CLIP's predictor). torch's unscales each device's and
    dtype's gradients in one call of `_amp_foreach_non_finite_check_and_unscale_`, which
    DTensor refuses for a list mixing both; here the two kinds go in separate calls. For
    the DTensors, DTensor's handler of that op checks and unscales the local shards, then
    max-reduces `found_inf` over the processes (collective), so every process skips the same
    steps; the replicated gradients are the same on every process (synced before). A second
    `unscale_` before `update` is a no-op (Accelerate's clip_grad_norm_ under an FSDP
    launch that it runs as MULTI_CPU unscales twice)."""

    @classmethod
    def like(cls, scaler: torch.amp.GradScaler, device: torch.device) -> GradScaler:
        """This class with `scaler`'s settings (Accelerate made `scaler`)."""
        sharded = cls(device.type, enabled=scaler.is_enabled())
        if scaler.is_enabled():
            sharded.load_state_dict(scaler.state_dict())
        return sharded

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.is_enabled() and self._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED:
            return
        super().unscale_(optimizer)

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool
    ) -> dict[torch.device, torch.Tensor]:
        groups: dict[tuple[bool, torch.dtype], list[torch.Tensor]] = {}  # (DTensor?, dtype) -> gradients
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not allow_fp16 and p.grad.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                groups.setdefault((isinstance(p.grad, DTensor), p.grad.dtype), []).append(p.grad)
        with torch.no_grad():
            for grads in groups.values():  # the same keys, in the same order, on every process
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        return {found_inf.device: found_inf}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on the main process, on the CPU ({} elsewhere). Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- resumable state: every process's local shards as safetensors + JSON (no pickle)


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's shards of the model and optimiser state, keyed by parameter name, and
    the full shape of each sharded tensor (to reassemble them for another process count)."""
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    shapes: dict[str, list[int]] = {}

    def keep(key: str, t: Any) -> Any:
        if isinstance(t, DTensor):
            shapes[key] = list(t.shape)
            return t.to_local()
        return t

    model_local = {k: keep(f"model/{k}", v) for k, v in model_sd.items()}
    optim_local = {n: {k: keep(f"optim/{n}/{k}", v) for k, v in s.items()} for n, s in optim_sd["state"].items()}
    return {"model": model_local, "optimizer": {"state": optim_local, "param_groups": optim_sd["param_groups"]},
            "shapes": shapes, "world_size": dist.get_world_size()}


def load_local_states(model: nn.Module, optimizer: torch.optim.Optimizer, states: list[dict[str, Any]]) -> None:
    """Restore model and optimiser from every process's `local_state` (in rank order), saved
    with any number of processes: sharded tensors are put together along dim 0 (FSDP2
    shards by rows) and sharded anew for this run's processes."""
    shapes = states[0]["shapes"]

    def whole(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
        if key not in shapes:
            return parts[0]
        full = torch.cat([p.reshape(-1, *shapes[key][1:]) for p in parts]) if len(parts) > 1 else parts[0]
        return full.reshape(shapes[key])

    model_sd = {k: whole(f"model/{k}", [s["model"][k] for s in states]) for k in states[0]["model"]}
    optim_state = {
        n: {k: whole(f"optim/{n}/{k}", [s["optimizer"]["state"][n][k] for s in states]) for k in entry}
        for n, entry in states[0]["optimizer"]["state"].items()
    }
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, {"state": optim_state, "param_groups": states[0]["optimizer"]["param_groups"]},
                             options=options)

"""The one interface every continual strategy implements.

The training loop calls, once after the model is built and before the optimiser is:

    model = strategy.prepare_model(model)   # e.g. freeze weights, add adapters or a predictor

once after the model is prepared (Accelerate):

    strategy.bind(context)        # preprocess, tokenizer, rank, world size, seed, device, config

and per phase:

    strategy.begin_phase(phase, model, old_model)
    for each step:  loss, logs = strategy.loss(model, batch, old_model)      # under autocast
                    loss.backward() ...
                    strategy.before_step(model)      # gradients synced, before clipping and the step
    strategy.end_phase(phase, model, old_model, batches)                    # e.g. EWC Fisher

`model` is the prepared (possibly DistributedDataParallel) model; `old_model` is the frozen
snapshot that ended the previous phase (None during the first phase). Batches are this
process's share of the global batch; losses that compare samples gather features across
processes so the math covers the global batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor

from modx.config import StrategyConfig
from modx.losses import ClipLoss

Batch = dict[str, Any]


@dataclass
class Context:
    """What a strategy may need beyond its config (Strategy.bind): to read data of its own
    (e.g. reference shards with modx.data.make_loader) or to build models alike."""

    config: Any  # the whole modx.config.Config of the run
    preprocess_train: Callable
    preprocess_eval: Callable
    tokenizer: Callable
    rank: int
    world_size: int
    device: Any
    frozen_copy: Callable | None = None  # model -> a frozen copy sharded like it (FSDP); None: not sharded
    plain_copy: Callable | None = None  # sharded model -> a whole, unsharded copy on every process (collective)
    align_initial: bool = True  # phase 0 has an old model (the loaded initial weights); False: from scratch


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a tensor of a sharded (FSDP) model, a DTensor; any other
    tensor as it is. Elementwise updates of sharded models work on these shards."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_rows(t: torch.Tensor) -> slice:
    """The rows (dim 0) of the whole tensor that this process's shard of `t` holds: FSDP2
    shards dim 0 as torch.chunk does (process r: rows r c .. (r + 1) c - 1, c = ceil(n / N),
    fewer or none at the end). All rows when `t` is not a DTensor."""
    n = t.shape[0] if t.ndim else 1
    if not isinstance(t, DTensor):
        return slice(0, n)
    mesh = t.device_mesh
    c = -(-n // mesh.size())
    start = min(mesh.get_local_rank() * c, n)
    rows = slice(start, min(start + c, n))
    if rows.stop - rows.start != t.to_local().shape[0]:
        raise RuntimeError(f"a shard of {tuple(t.shape)} holds {t.to_local().shape[0]} rows, not the "
                           f"{rows.stop - rows.start} of torch.chunk: not an FSDP2 dim-0 shard")
    return rows


def sharded_sum(values: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The sum over processes of the (term, tensor) pairs' terms computed from local shards
    (each process its part), the terms of replicated tensors counted once: a 0-d float32
    tensor, the same on every process (collective when any tensor is a DTensor)."""
    parts = [term.float() for term, t in values if isinstance(t, DTensor)]
    whole = [term.float() for term, t in values if not isinstance(t, DTensor)]
    total = torch.stack(parts).sum() if parts else torch.zeros((), device=values[0][0].device)
    if parts:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total + torch.stack(whole).sum() if whole else total


@contextlib.contextmanager
def whole_parameters(*modules: nn.Module) -> Iterator[None]:
    """Within the block the sharded (DTensor) parameters of `modules` are whole tensors of
    their full shape (uninitialised), for code that writes them whole, e.g. an init drawn
    from a seeded generator; afterwards each shard takes its rows of what was written
    (the same values as an unsharded model's if every process draws alike). No-op for
    modules without DTensor parameters."""
    swapped = []
    for module in modules:
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if isinstance(p, DTensor):
                    whole = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device),
                                         requires_grad=p.requires_grad)
                    owner._parameters[name] = whole
                    swapped.append((owner, name, p, whole))
    written = False
    try:
        yield
        written = True
    finally:
        with torch.no_grad():
            for owner, name, p, whole in swapped:
                owner._parameters[name] = p
                if written:
                    p.to_local().copy_(whole[shard_rows(p)])


class Strategy:
    """Plain contrastive fine-tuning (CLIP_ct); other strategies add terms or hooks."""

    name = "finetune"
    default_replay_ratio = 0.0
    joint = False  # train once on every phase's data (the upper bound)
    uses_old_model = False  # the loss runs the old model at every step (one more forward)

    @classmethod
    def plain_phases(cls, cfg: StrategyConfig, align_initial: bool) -> int | None:
        """How many leading phases this strategy trains exactly as plain fine-tuning and
        leaves no state of its own after (None: all). modx-bench trains those phases once
        for every strategy that shares them. `align_initial`: phase 0 has an old model."""
        return None

    def __init__(self, cfg: StrategyConfig, accelerator: Accelerator, local_loss: bool = True):
        self.cfg = cfg
        self.accelerator = accelerator
        self.local_loss = local_loss  # train.local_loss: each rank scores its rows only
        self.clip_loss = ClipLoss(local_loss=local_loss)
        self.old_samples = 0  # samples the old model ran a forward on (this process; a cost)
        self.extra_samples = 0  # samples trained forward + backward outside training steps

    def forward(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return model(batch["image"], batch["text"])

    def contrastive(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """CLIP loss over the global batch: (CE_i2t + CE_t2i) / 2."""
        return self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        clip = self.contrastive(self.forward(model, batch))
        return clip, {"loss_clip": clip.detach()}

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A copy of the (unwrapped) model that is never optimised: eval mode, no gradients;
        under FSDP sharded like it (never a whole copy on a process)."""
        if self.sharded:
            return self.context.frozen_copy(model)
        return copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (FSDP): tensors of its shape are local shards."""
        return getattr(getattr(self, "context", None), "frozen_copy", None) is not None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Called once on the bare model before the optimiser is built from its trainable
        parameters and before Accelerate prepares it (also when a run resumes): freeze
        parameters or add modules here, never later (DDP and the optimiser hold the
        parameters from then on). Returns the model to train."""
        return model

    def bind(self, context: Context) -> None:
        """Called once, after the model is built and prepared, before anything else."""
        self.context = context

    def begin_phase(self, phase: int, model: nn.Module, old_model: nn.Module | None) -> None:
        """Called before the first step of `phase` (also after a resume inside it)."""

    def before_step(self, model: nn.Module) -> None:
        """Called when an optimiser step's gradients are complete (accumulated and synced
        over processes), before clipping and the optimiser step: e.g. to project them.
        Sharded (FSDP) they are DTensors, and under fp16 already unscaled."""

    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        """Called after the last step of `phase`, before the model is snapshotted and evaluated."""

    def state_dict(self) -> dict[str, Any]:
        """Strategy state to checkpoint (this process's; saved per rank): nested dicts and
        lists of tensors, numbers and strings, stored as safetensors + JSON (no pickle)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def resume_within_segment(self) -> None:
        """Called after load_state_dict when the state was saved inside a segment of the
        data stream (a preemption: modx.train.data): streams of the strategy's own go on
        from where the state was saved instead of starting a new segment there."""

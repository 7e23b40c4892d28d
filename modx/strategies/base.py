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

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
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


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a tensor of a sharded (FSDP) model, a DTensor; any other
    tensor as it is. Elementwise updates of sharded models work on these shards."""
    return t.to_local() if isinstance(t, DTensor) else t


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
        over processes), before clipping and the optimiser step: e.g. to project them."""

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

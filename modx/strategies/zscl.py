"""ZSCL (Zheng et al., ICCV 2023): distillation from the INITIAL model on reference data,
an L2 pull to the phase's start and a weight ensemble (the authors' mtil/src/models/finetune.py
with scripts/ZSCL.sh; every difference: docs/training.md "ZSCL").

Per step, besides the CLIP loss of the batch, a reference batch of image-text pairs
(`strategy.reference`, eval preprocessing as the authors) goes through the initial model
(no autograd: image features I0, text features T0) and the current image tower (I):

    L = CLIP + w_img L_img + w_txt L_txt + l2 * sum_p (p - p_start)^2
    L_img = T^2 mean_i H(softmax(s I0_i T0^T / T), softmax(s I_i T0^T / T))    # rows: images
    L_txt = T^2 mean_j H(softmax(s T0_j I0^T / T), softmax(s T0_j I^T / T))    # rows: texts

with H the cross-entropy, s the initial model's logit scale and T = 2. As in the authors'
code the texts are the INITIAL model's (the student's text tower is not distilled). The
reference batch is global: I, I0, T0 are gathered over processes (I with gradients) and each
process scores its own rows against all columns (the mean over processes is the global value).

Weight ensemble: after optimiser step s of a phase (s = 1, 2, ...), when (s - 1) % N == 0
(N = zscl_we_every: the authors' `iteration % avg_freq == 0`), W <- (n W + theta) / (n + 1)
with n the merges so far and W = the phase's start weights at first; at the phase end the
model becomes W (it is what is exported, evaluated, and the next phase starts from).

From scratch (no initial weights loaded: Context.align_initial False) phase 0 is plain CLIP
training and the model it ends with is the initial model of the later phases (a random
model has nothing to keep); modx-bench shares that phase with the other strategies.

Sharded (FSDP): the initial model is a frozen copy sharded like the student (on a resume
each process reads its rows of the run's initial export), W is kept as local shards. The L2
pull's value is summed from the local shards over processes and added to the loss (no
autograd through the sharded parameters outside the forward); its gradient,
2 l2 (p - p_start), is added to the sharded gradients before the optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from modx.config import ConfigError
from modx.data import DataError, make_loader, parse_sources
from modx.data.seeds import preserved_rng, stable_seed
from modx.losses import (
    all_gather,
    full_precision,
    gather_features,
    global_clip_loss,
    world_info,
)
from modx.strategies.base import Batch, Context, Strategy, local, shard_rows, sharded_sum

REFERENCE_EPOCH = 1 << 20  # batches per rank before the reference loader starts a new epoch


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The authors' `distillation(t, s, T)`: T^2 mean_i H(softmax(t_i / T), softmax(s_i / T)),
    H(p, q) = -sum_j p_j log q_j, over the rows of the (rows, columns) logits. float32."""
    with full_precision(student):
        student, teacher = student.float(), teacher.detach().float()
        target = F.softmax(teacher / temperature, dim=1)  # (rows, columns)
        return -(target * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean() * temperature**2


def zscl_distillation(
    img: torch.Tensor,
    img_ref: torch.Tensor,
    txt_ref: torch.Tensor,
    scale: torch.Tensor | float,
    temperature: float = 2.0,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_img, L_txt) of ZSCL's feature-space distillation (module docstring), for this
    process's rows of the gathered (B, d) reference features: the student's image features
    `img`, the initial model's `img_ref` and `txt_ref` (normalised here), `scale` the
    initial model's exp'd logit scale. Rank r owns rows r*b .. (r+1)*b - 1 in both
    directions; the mean over ranks is the global value (on one process it is the global)."""
    b = img.shape[0] // world
    own = slice(rank * b, (rank + 1) * b)
    with full_precision(img):
        img = F.normalize(img.float(), dim=-1)
        img_ref = F.normalize(img_ref.detach().float(), dim=-1)
        txt_ref = F.normalize(txt_ref.detach().float(), dim=-1)
        scale = scale.detach().float() if isinstance(scale, torch.Tensor) else scale
        image_rows = soft_cross_entropy(scale * img[own] @ txt_ref.T, scale * img_ref[own] @ txt_ref.T, temperature)
        text_rows = soft_cross_entropy(scale * txt_ref[own] @ img.T, scale * txt_ref[own] @ img_ref.T, temperature)
        return image_rows, text_rows


def l2_to(model: nn.Module, anchor: nn.Module) -> torch.Tensor:
    """sum_p (p - p_anchor)^2 over the trainable parameters (the authors' `l2_loss`). float32."""
    anchor_params = dict(anchor.named_parameters())
    with full_precision(*anchor_params.values()):
        terms = [((p.float() - anchor_params[n].detach().float()) ** 2).sum()
                 for n, p in model.named_parameters() if p.requires_grad]
        return torch.stack(terms).sum()


def sharded_l2_to(model: nn.Module, anchor: nn.Module) -> torch.Tensor:
    """`l2_to` of a model sharded like its anchor, from the local shards (collective, no
    autograd): 0-d float32, the same on every process."""
    anchor_params = dict(anchor.named_parameters())
    with torch.no_grad():
        return sharded_sum([(((local(p).float() - local(anchor_params[n]).float()) ** 2).sum(), p)
                            for n, p in model.named_parameters() if p.requires_grad])


def load_rows(model: nn.Module, path: Path) -> None:
    """Load a whole-weights safetensors file into a sharded model: each process reads only
    the rows its shards hold (replicated tensors whole)."""
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        state = model.state_dict()
        if set(state) != set(f.keys()):
            raise RuntimeError(f"{path} holds other tensors than the model: {sorted(set(state) ^ set(f.keys()))[:5]}")
        for key, t in state.items():
            rows = shard_rows(t)
            local(t).copy_(f.get_slice(key)[rows.start : rows.stop] if t.ndim else f.get_tensor(key))


def reference_loader(urls: str, batch_size: int, context: Context, segment: int) -> Any:
    """This process's loader of reference pairs from `segment` (the reference batches read
    before it) on: resampled shards, the run's eval preprocessing and tokenizer, seeded by
    (train.seed, segment, rank) so that a resumed run reads what the uninterrupted run read.
    A segment starts where the training stream's does (at a phase start or a periodic
    checkpoint, when state_dict closes the loader); a run resumed inside one rebuilds it and
    reads past the batches read since its start (resume_within_segment)."""
    cfg = context.config
    return make_loader(
        urls,
        mode="train",
        batch_size=batch_size,
        preprocess=context.preprocess_eval,
        tokenizer=context.tokenizer,
        workers=cfg.train.workers,
        seed=stable_seed(cfg.train.seed, segment, context.rank, "zscl-reference"),
        rank=context.rank,
        world_size=context.world_size,
        resampled=True,
        shuffle=cfg.train.shuffle,
        budget_steps=REFERENCE_EPOCH,
        missing_ok=True,
    )


class ZSCL(Strategy):
    name = "zscl"

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0 if align_initial else 1  # from scratch, phase 0 trains the model it keeps

    @property
    def from_scratch(self) -> bool:
        """No initial weights were loaded (Context.align_initial False): phase 0 is plain CLIP
        training and its result is the initial model the later phases keep."""
        return not getattr(getattr(self, "context", None), "align_initial", True)

    @property
    def plain(self) -> bool:
        """This phase trains as fine-tuning does (phase 0 from scratch)."""
        return self.from_scratch and self.phase == 0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.initial: nn.Module | None = None  # the model before phase 0, frozen
        self.anchor: nn.Module | None = None  # the phase's start weights (the L2 pull)
        self.average: dict[str, torch.Tensor] = {}  # the weight ensemble W of the phase
        self.merges = 0  # models averaged into W besides the phase's start
        self.phase = -1  # the phase W belongs to
        self.steps = 0  # optimiser steps of that phase so far
        self.merge_due = False  # a step ended whose weights W takes in (at the next loss or phase end)
        self.read = 0  # reference batches read by this process
        self.segment = 0  # of those, read before the current loader's segment started
        self.seek = 0  # reference batches the next loader reads past (a resume inside a segment)
        self.resumed = False
        self.batches: Iterator[Batch] | None = None
        self.loader: Any = None

    # ---- binding and reference data

    def bind(self, context: Context) -> None:
        super().bind(context)
        try:
            parse_sources(self.cfg.reference)
        except DataError as err:
            raise ConfigError("strategy.reference", str(err)) from None
        size = self.cfg.zscl_batch or context.config.train.batch_size
        if size % context.world_size:
            raise ConfigError("strategy.zscl_batch" if self.cfg.zscl_batch else "train.batch_size",
                              f"the reference batch {size} does not split evenly over {context.world_size} processes")
        self.local_batch = size // context.world_size

    def reference_batch(self) -> Batch:
        """This process's next reference batch (image, text) on the device."""
        if self.batches is None:
            self.segment = self.read - self.seek
            self.loader = reference_loader(self.cfg.reference, self.local_batch, self.context, self.segment)
            self.batches = iter(self.loader)
            with preserved_rng():  # as the training stream's fast-forward (modx.train.data)
                for _ in range(self.seek):
                    self._next_reference()
            self.seek = 0
        batch = self._next_reference()
        self.read += 1
        device = self.context.device
        return {"image": batch["image"].to(device, non_blocking=True), "text": batch["text"].to(device, non_blocking=True)}

    def _next_reference(self) -> Batch:
        batch = next(self.batches, None)
        if batch is None:  # an epoch is over (or there was nothing to read)
            self.batches = iter(self.loader)
            batch = next(self.batches, None)
            if batch is None:
                raise ConfigError("strategy.reference", f"no reference batch could be read from {self.cfg.reference} "
                                  f"(loader counts: {self.loader.stats.as_dict()}); are the shards empty?")
        return batch

    # ---- phases and steps

    def begin_phase(self, phase: int, model: nn.Module, old_model: nn.Module | None) -> None:
        net = self.accelerator.unwrap_model(model)
        if self.from_scratch and phase == 0:
            self.phase, self.steps, self.merges, self.merge_due, self.average = 0, 0, 0, False, {}
            return
        if self.initial is None:
            self.initial = self.initial_model(net)
        self.anchor = old_model if old_model is not None else self.initial
        if self.phase != phase:  # a new phase, not a resume inside one
            self.phase, self.steps, self.merges, self.merge_due = phase, 0, 0, False
            self.average = {}
            if self.cfg.zscl_we_every:  # local shards under FSDP
                self.average = {n: local(p).detach().float().clone() for n, p in net.named_parameters()}

    def initial_model(self, net: nn.Module) -> nn.Module:
        """A frozen copy of the initial model: the model before phase 0, or from scratch the
        model after it; the current weights on a fresh run (begin_phase(0), or (1) from
        scratch, comes before any step of it), the run's export of them on a resume
        (checkpoints/initial, or phase-0: the loop writes both). Draws no random numbers.
        Sharded like the model under FSDP."""
        initial = self.frozen_copy(net)
        if self.resumed:
            export = "phase-0" if self.from_scratch else "initial"
            path = Path(self.context.config.train.output_dir) / "checkpoints" / export / "model.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"zscl resumes its initial model from {path}, which is missing: "
                                        "it is written when the run starts (from scratch: when phase 0 ends); "
                                        "start the run anew")
            if self.sharded:
                load_rows(initial, path)
            else:
                initial.load_state_dict(load_file(str(path)))  # into the copy's tensors, on its device
        return initial

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.plain:
            return super().loss(model, batch, old_model)
        if self.merge_due:  # the weights the last optimiser step left
            self.merge(model)
        l2 = None
        if self.cfg.zscl_l2 and self.sharded:  # its value; the gradient comes in before_step
            l2 = sharded_l2_to(self.accelerator.unwrap_model(model), self.anchor)  # before the forward: all sharded
        reference = self.reference_batch()
        b = batch["image"].shape[0]
        # one forward of the prepared model: the batch's pairs and the reference images
        out = model(torch.cat([batch["image"], reference["image"]]), batch["text"])
        img, ref_img = out["image_features"][:b], out["image_features"][b:]  # (b, d), (b_ref, d)
        with torch.no_grad():
            teacher = self.initial(reference["image"], reference["text"])
        n_ref = reference["image"].shape[0]
        self.old_samples += n_ref  # the initial model's forward
        self.extra_samples += n_ref  # the reference images through the trained image tower

        rank, world = world_info()
        clip, _, _ = global_clip_loss(img, out["text_features"], out["logit_scale"], local_loss=self.local_loss)
        student, txt_ref = gather_features(ref_img, teacher["text_features"])  # the teacher's: no gradient
        img_ref = all_gather(teacher["image_features"])
        scale = self.initial.logit_scale.exp()
        l_img, l_txt = zscl_distillation(student, img_ref, txt_ref, scale, self.cfg.zscl_temperature, rank, world)
        total = clip + self.cfg.zscl_image_weight * l_img + self.cfg.zscl_text_weight * l_txt
        logs = {"loss_clip": clip.detach(), "loss_zscl_image": l_img.detach(), "loss_zscl_text": l_txt.detach()}
        if self.cfg.zscl_l2:
            if l2 is None:
                l2 = l2_to(self.accelerator.unwrap_model(model), self.anchor)
            total = total + self.cfg.zscl_l2 * l2
            logs["loss_l2"] = l2.detach()
        return total, logs

    def before_step(self, model: nn.Module) -> None:
        if self.plain:
            return
        if self.cfg.zscl_l2 and self.sharded:
            self.add_l2_gradient(self.accelerator.unwrap_model(model))
        self.steps += 1
        every = self.cfg.zscl_we_every
        self.merge_due = bool(every) and (self.steps - 1) % every == 0

    def add_l2_gradient(self, net: nn.Module) -> None:
        """Sharded: add the L2 pull's gradient 2 l2 (p - p_start) to every shard's gradient."""
        anchor = dict(self.anchor.named_parameters())
        with torch.no_grad():
            for n, p in net.named_parameters():
                if not p.requires_grad:
                    continue
                if p.grad is None:  # unused in the forward: the pull is all of its gradient
                    p.grad = torch.zeros_like(p)
                grad = 2 * self.cfg.zscl_l2 * (local(p).float() - local(anchor[n]).float())
                local(p.grad).add_(grad.to(local(p.grad).dtype))

    def merge(self, model: nn.Module) -> None:
        """W <- (n W + theta) / (n + 1) (the authors' `merge_we`)."""
        self.merges += 1
        with torch.no_grad():
            for n, p in self.accelerator.unwrap_model(model).named_parameters():
                self.average[n].lerp_(local(p).detach().float(), 1.0 / (self.merges + 1))
        self.merge_due = False

    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        if not self.cfg.zscl_we_every or self.plain:
            return
        if self.merge_due:
            self.merge(model)
        with torch.no_grad():
            for n, p in self.accelerator.unwrap_model(model).named_parameters():
                local(p).copy_(self.average[n].to(p.dtype))
        self.average = {}  # the next phase averages anew (and the phase-end checkpoint stays small)

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """W and its counts, the phase's step count, the reference batches read, and of
        those the ones read before the current reference segment. A checkpoint starts a new
        segment of the reference stream (as of the training stream): the uninterrupted run
        and a run resumed from here read the same reference batches (from inside a segment:
        resume_within_segment)."""
        segment = self.segment if self.loader is not None else self.read
        if self.loader is not None:
            self.loader.close()
        self.loader, self.batches = None, None
        state = {"average": self.average, "merges": self.merges, "phase": self.phase, "steps": self.steps,
                 "merge_due": self.merge_due, "reference_batches": self.read,
                 "reference_segment": segment}
        if self.sharded:  # W as local shards, of this many processes
            state["world_size"] = self.context.world_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.accelerator.device  # checkpoints hold CPU tensors
        saved = state.get("world_size")
        if saved is not None and saved != self.context.world_size and state.get("average"):
            raise ConfigError("strategy.name", f"this ZSCL state holds its weight ensemble sharded over {saved} "
                              f"processes; resume it with {saved} processes")
        self.average = {n: w.to(device) for n, w in state.get("average", {}).items()}
        self.merges, self.phase, self.steps = state.get("merges", 0), state.get("phase", -1), state.get("steps", 0)
        self.merge_due, self.read = state.get("merge_due", False), state.get("reference_batches", 0)
        self.segment = state.get("reference_segment", self.read)
        self.resumed = True

    def resume_within_segment(self) -> None:
        self.seek = self.read - self.segment

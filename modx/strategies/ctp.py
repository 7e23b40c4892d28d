"""CTP (Zhu et al., ICCV 2023): compatible momentum contrast and topology preservation (the
authors' models/clip_pretrain.py, `CTP_init` and `CTP`; every difference: docs/training.md
"CTP"). modx's CLIP has no fusion encoder: the MLM loss and its distillations are not kept.

A momentum model M (a copy of the model at each phase start, no autograd) follows the model
after every optimiser step,

    without an old model:  M <- m M + (1 - m) theta                            (m = 0.995)
    with the old model:    M <- c M + (1 - c)/2 theta + (1 - c)/2 theta_old    (c = 0.9)

and its features of every batch enter a queue of Q = 1024 image and text features (kept over
phases; random unit vectors at first). Per step, with features normalised and tau = 0.07:

    L = CLIP + w_c (MC_i2t + MC_t2i)/2                                         (no old model)
    L = CLIP + w_c (MC_i2t + MC_t2i)/2 + w_t [(KL_i2t + KL_t2i)/2 + (KL_i2i + KL_t2t)/2]

    MC_i2t = mean_i -log softmax(I_i [T^M; queue_T]^T / tau)[i]        # momentum contrast
    KL_x2y = mean_i KL(softmax(X^o_i Y^o^T / tau) || softmax(X_i Y^T / tau))   # topology, old model o

where the same-modal rows (i2i, t2t) leave out sample i's own column. Every matrix covers the
GLOBAL batch: the columns are gathered over processes (the model's with gradients) and each
process scores its own rows; the mean over processes is the global value.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modx.config import ConfigError
from modx.losses import (
    all_gather,
    full_precision,
    gather_features,
    global_clip_loss,
    world_info,
)
from modx.strategies.base import Batch, Strategy, local

QUEUE_SEED = 0  # the queue starts as random unit vectors drawn from this seed (no global RNG)


def momentum_contrast(
    rows: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float, offset: int = 0
) -> torch.Tensor:
    """CTP's momentum contrast of one direction: rows (b, d) against the momentum keys of the
    global batch (B, d) followed by the queue (Q, d); row i's positive is key offset + i:

        mean_i -log softmax(rows_i [keys; queue]^T / tau)[offset + i]        # (b, B + Q) logits

    Inputs are normalised here; keys and queue carry no gradient. float32."""
    with full_precision(rows):
        rows = F.normalize(rows.float(), dim=-1)
        columns = F.normalize(torch.cat([keys.detach().float(), queue.detach().float()]), dim=-1)  # (B + Q, d)
        logits = rows @ columns.T / temperature
        target = torch.arange(offset, offset + rows.shape[0], device=rows.device)
        return F.cross_entropy(logits, target)


def topology_kl(
    rows: torch.Tensor,
    columns: torch.Tensor,
    old_rows: torch.Tensor,
    old_columns: torch.Tensor,
    temperature: float,
    offset: int = 0,
    same_modal: bool = False,
) -> torch.Tensor:
    """CTP's topology preservation of one direction (the authors' KLDivLoss(batchmean)):

        mean_i KL(softmax(old_rows_i old_columns^T / tau) || softmax(rows_i columns^T / tau))

    rows (b, d) against columns (B, d), the old model's alike (no gradient); with
    `same_modal` row i leaves out its own column offset + i (the authors mask it with -1000,
    which underflows to probability 0). Inputs are normalised here. float32."""
    with full_precision(rows):
        rows, columns = F.normalize(rows.float(), dim=-1), F.normalize(columns.float(), dim=-1)
        old_rows = F.normalize(old_rows.detach().float(), dim=-1)
        old_columns = F.normalize(old_columns.detach().float(), dim=-1)
        new, old = rows @ columns.T / temperature, old_rows @ old_columns.T / temperature  # (b, B)
        if same_modal:  # (b, B) -> (b, B - 1): row i without column offset + i
            b, n = new.shape
            keep = torch.ones(b, n, dtype=torch.bool, device=new.device)
            keep[torch.arange(b, device=new.device), torch.arange(offset, offset + b, device=new.device)] = False
            new, old = new[keep].view(b, n - 1), old[keep].view(b, n - 1)
        log_old, log_new = F.log_softmax(old, dim=1), F.log_softmax(new, dim=1)
        return (log_old.exp() * (log_old - log_new)).sum(dim=1).mean()


class CTP(Strategy):
    name = "ctp"
    uses_old_model = True  # from the first old model on (the momentum model runs at every step)

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0  # the momentum contrast and its queue from phase 0 on

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.momentum: nn.Module | None = None  # the momentum model of the phase
        self.loaded: dict[str, torch.Tensor] = {}  # its parameters from a checkpoint, until begin_phase
        self.phase = -1  # the phase the momentum model belongs to
        self.ema_due = False  # an optimiser step ended that the momentum model has not followed yet
        self.queue_image: torch.Tensor | None = None  # (Q, d)
        self.queue_text: torch.Tensor | None = None  # (Q, d)
        self.ptr = 0  # next queue row to overwrite

    def begin_phase(self, phase: int, model: nn.Module, old_model: nn.Module | None) -> None:
        net = self.accelerator.unwrap_model(model)
        self.momentum = self.frozen_copy(net)  # sharded like the model under FSDP
        if self.phase == phase and self.loaded:  # resumed inside the phase: the saved momentum model
            params = dict(self.momentum.named_parameters())
            with torch.no_grad():
                for n, value in self.loaded.items():
                    local(params[n]).copy_(value)
        else:  # the authors: a copy of the model at every task's start
            self.phase, self.ema_due = phase, False
        self.loaded = {}

    def before_step(self, model: nn.Module) -> None:
        self.ema_due = True  # followed at the next loss, with the weights this step leaves

    def follow(self, model: nn.Module, old_model: nn.Module | None) -> None:
        """One EMA step of the momentum model (module docstring), on the parameters."""
        net = self.accelerator.unwrap_model(model)
        pairs = zip(self.momentum.parameters(), net.parameters())
        with torch.no_grad():
            if old_model is None:
                m = self.cfg.ctp_momentum
                for p_m, p in pairs:  # elementwise: on the local shards under FSDP
                    local(p_m).mul_(m).add_(local(p).detach(), alpha=1 - m)
            else:
                c = self.cfg.ctp_compatible_momentum
                for (p_m, p), p_old in zip(pairs, old_model.parameters()):
                    local(p_m).mul_(c).add_(local(p).detach(), alpha=(1 - c) / 2).add_(local(p_old), alpha=(1 - c) / 2)
        self.ema_due = False

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ema_due:
            self.follow(model, old_model)
        out = self.forward(model, batch)
        img, txt = out["image_features"], out["text_features"]  # (b, d)
        b = img.shape[0]
        rank, _ = world_info()
        offset = rank * b  # this process's rows in the global batch
        clip, img_all, txt_all = global_clip_loss(img, txt, out["logit_scale"], local_loss=self.local_loss)
        tau = self.cfg.ctp_temperature

        with torch.no_grad():
            mom = self.momentum(batch["image"], batch["text"])
        self.old_samples += b
        key_img, key_txt = gather_features(mom["image_features"].float(), mom["text_features"].float(),
                                           gather_with_grad=False)  # (B, d)
        if self.queue_image is None:
            self.queue_image, self.queue_text = self.random_queue(key_img.shape[1], key_img.device)
        contrast = (momentum_contrast(img, key_txt, self.queue_text, tau, offset)
                    + momentum_contrast(txt, key_img, self.queue_image, tau, offset)) / 2
        self.enqueue(key_img, key_txt)
        total = clip + self.cfg.ctp_contrast_weight * contrast
        logs = {"loss_clip": clip.detach(), "loss_momentum": contrast.detach()}
        if old_model is not None:
            with torch.no_grad():
                old = old_model(batch["image"], batch["text"])
            self.old_samples += b
            old_img, old_txt = old["image_features"], old["text_features"]
            old_img_all, old_txt_all = all_gather(old_img), all_gather(old_txt)
            cross = (topology_kl(img, txt_all, old_img, old_txt_all, tau, offset)
                     + topology_kl(txt, img_all, old_txt, old_img_all, tau, offset)) / 2
            same = (topology_kl(img, img_all, old_img, old_img_all, tau, offset, same_modal=True)
                    + topology_kl(txt, txt_all, old_txt, old_txt_all, tau, offset, same_modal=True)) / 2
            total = total + self.cfg.ctp_topology_weight * (cross + same)
            logs.update(loss_topology_cross=cross.detach(), loss_topology_same=same.detach())
        return total, logs

    def random_queue(self, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (Q, d) queues of random unit vectors (the authors' start), from QUEUE_SEED."""
        g = torch.Generator().manual_seed(QUEUE_SEED)
        size = self.cfg.ctp_queue_size
        image, text = torch.randn(size, dim, generator=g), torch.randn(size, dim, generator=g)
        return F.normalize(image, dim=1).to(device), F.normalize(text, dim=1).to(device)

    def enqueue(self, key_img: torch.Tensor, key_txt: torch.Tensor) -> None:
        """Overwrite the oldest B rows with the global batch's momentum features."""
        rows = (self.ptr + torch.arange(key_img.shape[0], device=key_img.device)) % self.cfg.ctp_queue_size
        self.queue_image[rows] = key_img.to(self.queue_image.dtype)
        self.queue_text[rows] = key_txt.to(self.queue_text.dtype)
        self.ptr = (self.ptr + key_img.shape[0]) % self.cfg.ctp_queue_size

    def end_phase(self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Any) -> None:
        self.momentum = None  # the next phase starts its own (and the phase-end checkpoint stays small)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"phase": self.phase, "ema_due": self.ema_due, "ptr": self.ptr}
        if self.momentum is not None:
            state["momentum"] = {n: local(p) for n, p in self.momentum.named_parameters()}  # shards under FSDP
            state["world_size"] = self.context.world_size if self.sharded else None
        if self.queue_image is not None:
            state["queue_image"], state["queue_text"] = self.queue_image, self.queue_text
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.accelerator.device  # checkpoints hold CPU tensors
        self.phase, self.ema_due, self.ptr = state.get("phase", -1), state.get("ema_due", False), state.get("ptr", 0)
        saved = state.get("world_size")
        if saved is not None and saved != self.context.world_size:
            raise ConfigError("strategy.name", f"this CTP state holds the momentum model sharded over {saved} "
                              f"processes; resume it with {saved} processes")
        self.loaded = {n: p.to(device) for n, p in state.get("momentum", {}).items()}
        if "queue_image" in state:
            self.queue_image, self.queue_text = state["queue_image"].to(device), state["queue_text"].to(device)

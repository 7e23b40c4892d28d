"""Mod-X (Ni et al., ICML 2023; PAPERS.md section 1).

L = (CE_i2t + CE_t2i) / 2 + alpha * (KL_i2t + KL_t2i) / 2, where the KL terms compare every
row of the old model's similarity matrix S_o = I_o T_o^T with the new model's S = I T^T
(softmax(row / tau)), after replacing the rows the old model gets wrong by the new rows
(selective "cognition" alignment). Both matrices cover the GLOBAL batch: features are
gathered across processes, with gradients for the new model's (modx.losses.gather_features).
With train.local_loss each process computes only its rows of both matrices against the
gathered columns (modx.losses.clip_loss_local / modx_kl_local): the same gradients.
During the first phase there is no old model and the loss is the plain CLIP loss.
"""

from __future__ import annotations

from collections import ChainMap

import torch
from torch import nn

from modx.losses import (
    all_gather,
    gather_features,
    global_clip_loss,
    modx_kl,
    modx_kl_local,
    world_info,
)
from modx.strategies.base import Batch, Strategy


class ModX(Strategy):
    name = "modx"
    uses_old_model = True
    default_replay_ratio = 0.25  # modx's default: the KL over a small replay buffer (docs/strategies.md)

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0 if align_initial else 1  # without an old model, phase 0 is plain CLIP

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.forward(model, batch)
        # = self.contrastive(out), keeping the gathered (B_global, d) features for the KL
        clip, img, txt = global_clip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                          local_loss=self.local_loss)
        rank, world = world_info()
        local = self.local_loss and world > 1
        if old_model is None:
            return clip, {"loss_clip": clip.detach()}
        on, mine, keep = self.kl_on, None, None
        if on != "batch":  # Mod-X's KL over the replayed samples alone
            mine, keep = self.replayed(batch, img.device)
            pairs = int(keep.sum()) >= 2
            if on == "replay" or pairs:
                on = "replay"
                if not pairs:  # no pair to compare yet
                    return clip, {"loss_clip": clip.detach(), "loss_kl": torch.zeros(())}
        # The old model runs on the samples its KL compares: on the replayed ones alone when
        # the KL is over them (a quarter of the batch at the default ratio).
        img_old, txt_old = self.old_features(old_model, batch, mine if on == "replay" else None, out)
        img_old, txt_old = gather_features(img_old, txt_old, gather_with_grad=False)
        options = dict(
            temperature=self.cfg.temperature, cognition_align=self.cognition_align, reduction=self.cfg.reduction
        )
        if on == "replay":
            img, txt, img_old, txt_old = img[keep], txt[keep], img_old[keep], txt_old[keep]
        if local and on != "replay" and self.cfg.kl_diagonal:
            kl = modx_kl_local(img, txt, img_old, txt_old, rank, world, **options)
        else:  # the global computation (every process computes the same value)
            kl = modx_kl(img, txt, img_old, txt_old, diagonal=self.cfg.kl_diagonal, **options)
        total = clip + self.alpha(on) * kl
        return total, {"loss_clip": clip.detach(), "loss_kl": kl.detach()}

    @property
    def cognition_align(self) -> bool:
        return self.cfg.cognition_align

    def alpha(self, on: str) -> float:
        """strategy.alpha, else 20 for the KL over the batch (the authors' script) and 5 for
        the KL over the replayed samples (measured on the bench stream: docs/strategies.md)."""
        if self.cfg.alpha is not None:
            return self.cfg.alpha
        return 5.0 if on == "replay" else 20.0

    @property
    def kl_on(self) -> str:
        """strategy.kl_on: batch | replay | auto. `auto` without a replay buffer is `batch`;
        with one it is the replayed samples of each batch, or the whole batch while the
        buffer holds nothing earlier (phase 0 aligned with a pretrained start)."""
        ratio = self.default_replay_ratio if self.cfg.replay.ratio is None else self.cfg.replay.ratio
        return "batch" if self.cfg.kl_on == "auto" and ratio == 0 else self.cfg.kl_on

    @staticmethod
    def replayed(batch: Batch, device: torch.device) -> tuple[list[int], torch.Tensor]:
        """The replayed rows of this process's batch (batch["replayed"], a list of bools
        from the loader: no host sync), and the (B_global,) bool mask of those in the
        global batch."""
        flags = batch.get("replayed") or [False] * batch["image"].shape[0]
        mine = [i for i, f in enumerate(flags) if f]
        mask = torch.tensor(flags, dtype=torch.float32).to(device, non_blocking=True)
        return mine, all_gather(mask) > 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # view digest -> old features

    def begin_phase(self, phase: int, model: nn.Module, old_model: nn.Module | None) -> None:
        self.teacher = {}  # a new old model: nothing cached yet

    def old_features(
        self, old_model: nn.Module, batch: Batch, rows: list[int] | None, out: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The old model's (b, d) image and text features of this process's batch, computed
        without autograd; with `rows` only those rows (the others are zeros, never read).

        With strategy.teacher_cache the features of a replayed view are kept for the phase
        (the old model is fixed for it; at most strategy.replay.size views) and reused when
        the same view comes back. The cache is keyed by the view itself (batch["view"], a
        digest of its image tensor and tokens), never by the sample: a sample decoded and
        augmented anew is a new view and gets its own features. With random augmentation
        views rarely repeat (1 % of replayed rows on the bench stream), so it is off by
        default."""
        with torch.no_grad():
            if rows is None:
                self.old_samples += batch["image"].shape[0]
                old = old_model(batch["image"], batch["text"])
                return old["image_features"], old["text_features"]
            img = torch.zeros_like(out["image_features"], requires_grad=False)
            txt = torch.zeros_like(out["text_features"], requires_grad=False)
            views = batch.get("view") if self.cfg.teacher_cache else None
            if views is None:
                if rows:
                    self.old_samples += len(rows)
                    old = old_model(batch["image"][rows], batch["text"][rows])
                    img[rows], txt[rows] = old["image_features"].to(img.dtype), old["text_features"].to(txt.dtype)
                return img, txt
            first: dict[int, int] = {}  # view digest -> its first row in this batch
            for i in rows:
                if views[i] not in self.teacher:
                    first.setdefault(views[i], i)
            feats = ChainMap({}, self.teacher)  # digest -> (image, text) features, this batch's first
            if first:
                todo = list(first.values())
                self.old_samples += len(todo)
                old = old_model(batch["image"][todo], batch["text"][todo])
                for k, key in enumerate(first):
                    feats[key] = (old["image_features"][k].to(img.dtype), old["text_features"][k].to(txt.dtype))
                    if len(self.teacher) < self.cfg.replay.size:  # bounded: a phase's first views
                        self.teacher[key] = feats[key]
            if rows:
                img[rows] = torch.stack([feats[views[i]][0] for i in rows])
                txt[rows] = torch.stack([feats[views[i]][1] for i in rows])
            return img, txt


class Distill(ModX):
    """The same KL without selective alignment: every old row is distilled (an ablation)."""

    name = "distill"
    default_replay_ratio = 0.0  # the paper's KL over the whole batch, as an ablation of it

    @property
    def cognition_align(self) -> bool:
        return False

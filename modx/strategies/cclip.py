"""C-CLIP (Liu et al., ICLR 2025, "C-CLIP: Multimodal Continual Learning for Vision-Language
Model"), as the authors' code trains it (SmallPigPeppa/clip-lightning,
`clip_openai/model_distill_zeroshot_lora_best_v2.py`, the "distill_lora_v2" method of their
run scripts).

L = L_CLIP + cclip_weight x L_CKC. The contrastive knowledge consolidation (CKC) compares
the new model's features, mapped by a predictor h (Linear -> BatchNorm -> ReLU -> Linear),
with the old model's features of the same samples: of the 2B new rows [h(img); h(txt)] and
the 2B old rows [img_old; txt_old], row i of each side has row i of the other as its positive
and the other 2B - 1 rows as negatives, symmetric InfoNCE at the model's own logit scale
(`ckc_loss`). Both cover the GLOBAL batch (features gathered over processes, the predictor
run on the gathered rows so that its BatchNorm sees the global batch).

With `strategy.cclip_lora` (default) the towers' sequence backbones are frozen and every
Linear layer in them gets a LoRA adapter (peft; rank 16, alpha 32, dropout 0.1); the
embeddings, norms outside the backbones, projections and logit scale train fully, the patch
embedding is frozen. At every phase end the adapters are merged into their base weights and
start anew (the same parameter objects: DDP and the optimiser keep them), and the predictor
is initialised anew. Exports hold the merged plain weights (modx.models.plain_state_dict);
the predictor is a training aid left out of them.

Sharded (FSDP): the predictor runs outside the model's forward, so it stays whole on every
process (`modx_replicated`; its gradients averaged as DDP would); the merge adds this
process's rows of s B A to its shard of W (B's rows are sharded like W's, A is gathered),
and the new adapters are drawn whole, from the same seed as without FSDP, each shard
keeping its rows: the same values as an unsharded run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from modx.config import ConfigError
from modx.losses import clip_loss, full_precision, gather_features, global_clip_loss
from modx.strategies.base import Batch, Strategy, local, whole_parameters

# Where the towers' sequence backbones live: open_clip's vision and CLIP text towers, the
# text towers of CustomTextCLIP / modx (transformer or SSM blocks), a timm vision trunk.
BACKBONES = ("visual.transformer", "visual.trunk", "transformer", "text.transformer")


def ckc_loss(
    p_img: torch.Tensor, p_txt: torch.Tensor, z_img: torch.Tensor, z_txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """C-CLIP's contrastive knowledge consolidation over (B, d) features:

        P = normalize([p_img; p_txt]),  Z = normalize([z_img; z_txt])          # (2B, d), rows
        L_CKC = (CE(s P Z^T, diag) + CE(s Z P^T, diag)) / 2

    p: the new model's features through the predictor, z: the old model's, s: the logit
    scale (exponentiated). The authors' `simclr_distill_loss_func(p, z) +
    simclr_distill_loss_func(z, p)) / 2`: its mask keeps every column, the positive included.
    Float32 at least (float64 stays float64), autocast off."""
    with full_precision(p_img):
        p = F.normalize(_wide(torch.cat([p_img, p_txt])), dim=-1)  # (2B, d)
        z = F.normalize(_wide(torch.cat([z_img, z_txt])), dim=-1)
        return clip_loss(p, z, logit_scale)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class Predictor(nn.Module):
    """C-CLIP's predictor h: (n, d) -> (n, d), Linear -> BatchNorm -> ReLU -> Linear (the
    authors' DistillPredictor, hidden width 2048). A training aid: left out of exports."""

    modx_export = False  # modx.models.plain_state_dict leaves it out
    modx_replicated = True  # FSDP leaves it whole on every process (it runs outside the model's forward)

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def reset_parameters(self) -> None:
        for layer in self.net:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()  # BatchNorm: its running statistics too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def backbones(model: nn.Module) -> list[str]:
    """Names of `model`'s sequence backbones (see BACKBONES) that exist."""
    names = {n for n, _ in model.named_modules()}
    return [b for b in BACKBONES if b in names]


def lora_targets(model: nn.Module) -> list[str]:
    """The Linear layers C-CLIP adapts: every Linear in the sequence backbones but the
    out_proj of an nn.MultiheadAttention, whose weight the attention reads itself (an adapter
    there would never act: in the authors' code it does not either)."""
    inside_attention = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    prefixes = tuple(f"{b}." for b in backbones(model))
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(prefixes) and n not in inside_attention]


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Give the lora_targets peft LoRA adapters (B = 0: the model computes what it did) and
    set what trains as the authors do: in the backbones only the adapters, outside them
    everything but the patch embedding (visual.conv1)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model)
    if not targets:
        raise ConfigError("strategy.cclip_lora", f"found no Linear layer in a sequence backbone ({', '.join(BACKBONES)}) "
                          "of this model to adapt; set strategy.cclip_lora=false to train every parameter")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), model)
    inside = tuple(f"{b}." for b in backbones(model))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name if name.startswith(inside) else not name.startswith("visual.conv1."))
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight, W <- W + (alpha / r) B A, and start it anew
    (A random, B = 0): the model computes the same function and the next phase trains a new
    low-rank update on top (C-CLIP merges after each task). Parameters stay the same objects.
    Sharded (FSDP2 shards dim 0): W's rows += s B's rows A, A gathered (collective); A is drawn
    whole and each shard keeps its rows."""
    for layer in lora_layers(model):
        for adapter in layer.active_adapters:
            weight = layer.get_base_layer().weight  # (out, in)
            if isinstance(weight, DTensor):
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
                local(weight).add_((local(b) @ a.full_tensor()) * layer.scaling[adapter])
            else:
                weight += layer.get_delta_weight(adapter)
            with whole_parameters(layer.lora_A, layer.lora_B):
                layer.reset_lora_parameters(adapter, True)


class CCLIP(Strategy):
    name = "cclip"
    uses_old_model = True

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0  # its model carries adapters and a predictor from the start: not fine-tuning's

    def prepare_model(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        if c.cclip_lora:
            add_lora(model, c.cclip_lora_rank, c.cclip_lora_alpha, c.cclip_lora_dropout)
        model.cclip_predictor = Predictor(model.visual.output_dim, c.cclip_hidden)
        return model

    def loss(
        self, model: nn.Module, batch: Batch, old_model: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.forward(model, batch)
        clip, img, txt = global_clip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                          local_loss=self.local_loss)  # img, txt: (B_global, d)
        predictor = self.accelerator.unwrap_model(model).cclip_predictor
        if old_model is None:  # nothing to consolidate; DDP wants a gradient for every trainable parameter
            idle = sum(p.sum() for p in predictor.parameters()) * 0.0
            return clip + idle, {"loss_clip": clip.detach()}
        with torch.no_grad():
            self.old_samples += batch["image"].shape[0]
            old = old_model(batch["image"], batch["text"])
        z_img, z_txt = gather_features(old["image_features"], old["text_features"], gather_with_grad=False)
        # every process runs the predictor on the whole global batch, each modality apart (its
        # BatchNorm statistics are those of one process with the global batch)
        ckc = ckc_loss(predictor(img), predictor(txt), z_img, z_txt, out["logit_scale"])
        return clip + self.cfg.cclip_weight * ckc, {"loss_clip": clip.detach(), "loss_ckc": ckc.detach()}

    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        """Merge the adapters and start new ones, and a new predictor (each task of the
        authors is a new run). The new values are drawn from a seed of (train.seed, phase):
        the same on every process and for any number of processes, the global RNG untouched."""
        net = self.accelerator.unwrap_model(model)
        context = getattr(self, "context", None)
        with seeded((context.config.train.seed if context else 0) * 100_003 + phase):
            if self.cfg.cclip_lora:
                merge_lora(net)
            net.cclip_predictor.reset_parameters()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU and CUDA generators seeded with `seed`, then restore them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

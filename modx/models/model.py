"""Build an open_clip model (`CLIP`, `CustomTextCLIP`, `CoCa`) or a `ModxCLIP` from a model config.

A model config has open_clip's shape (`embed_dim`, `vision_cfg`, `text_cfg`, ...).
A tower config with a `backbone` key is a modx tower: `"transformer"` builds
open_clip's own tower from the remaining keys, anything else (`"s4d"`, `"s5"`,
`"SSAS"`, ...) an SSM tower from `modx.models.towers`. A config without any
`backbone` key is a plain open_clip config and builds exactly the class open_clip
would build, so its state dict keys are open_clip's.
"""

from __future__ import annotations

import logging
import math
from copy import deepcopy
from pathlib import Path

import torch
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP, _build_text_tower, _build_vision_tower
from torch import nn

from modx.models.towers import SSMTextCfg, SSMTextTower, SSMVisionCfg, SSMVisionTower

_log = logging.getLogger(__name__)


def is_modx_config(model_cfg: dict) -> bool:
    """True when a tower chooses its backbone (the model is then a `ModxCLIP`)."""
    return any("backbone" in model_cfg.get(k, {}) for k in ("vision_cfg", "text_cfg"))


def build_vision_tower(embed_dim: int, cfg: dict, quick_gelu: bool = False) -> nn.Module:
    cfg = dict(cfg)
    if cfg.get("backbone", "transformer") == "transformer":
        cfg.pop("backbone", None)
        return _build_vision_tower(embed_dim, cfg, quick_gelu)
    return SSMVisionTower(embed_dim, SSMVisionCfg.from_dict(cfg, "vision_cfg"))


def build_text_tower(embed_dim: int, cfg: dict, quick_gelu: bool = False) -> nn.Module:
    cfg = dict(cfg)
    if cfg.get("backbone", "transformer") == "transformer":
        cfg.pop("backbone", None)
        return _build_text_tower(embed_dim, cfg, quick_gelu)
    return SSMTextTower(embed_dim, SSMTextCfg.from_dict(cfg, "text_cfg"))


class ModxCLIP(CustomTextCLIP):
    """open_clip's `CustomTextCLIP` whose towers may have SSM backbones.

    Everything but the tower construction (encode_image / encode_text, forward
    returning {"image_features", "text_features", "logit_scale"}, locking, grad
    checkpointing) is open_clip's.
    """

    def __init__(
            self,
            embed_dim: int,
            vision_cfg: dict,
            text_cfg: dict,
            quick_gelu: bool = False,
            init_logit_scale: float = math.log(1 / 0.07),
            init_logit_bias: float | None = None,
            nonscalar_logit_scale: bool = False,
            output_dict: bool = True,
    ):
        nn.Module.__init__(self)  # CustomTextCLIP.__init__ would build open_clip towers
        self.output_dict = output_dict
        self.visual = build_vision_tower(embed_dim, vision_cfg, quick_gelu)
        self.text = build_text_tower(embed_dim, text_cfg, quick_gelu)
        self.context_length = self.text.context_length
        self.vocab_size = self.text.vocab_size
        lshape = [1] if nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.ones(lshape) * init_logit_scale)
        self.logit_bias = None
        if init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.ones(lshape) * init_logit_bias)


def _check_local_towers(model_cfg: dict, load_hf_weights: bool) -> None:
    """Never download: timm towers start random, HF towers must be local directories."""
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision_cfg.get("timm_model_name"):
        if vision_cfg.get("timm_model_pretrained"):
            _log.warning("timm_model_pretrained ignored: modx never downloads weights")
        vision_cfg["timm_model_pretrained"] = False
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and not Path(name).is_dir():
            raise ValueError(
                f"text_cfg.{key}={name!r} is not a local directory; modx never downloads models: "
                "point it at a local Hugging Face model directory (config.json + weights + tokenizer)")
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_pretrained"] = load_hf_weights


def build_model(model_cfg: dict, load_hf_weights: bool = True) -> nn.Module:
    """Instantiate the model a (resolved) model config describes, with output_dict=True.

    `load_hf_weights`: initialise a Hugging Face text tower from its local directory's
    weights (turn off when a full CLIP checkpoint is loaded right after).
    """
    cfg = deepcopy(model_cfg)
    _check_local_towers(cfg, load_hf_weights)
    if is_modx_config(cfg):
        cfg.pop("custom_text", None)
        return ModxCLIP(**cfg, output_dict=True)
    text_cfg = cfg.get("text_cfg", {})
    custom_text = cfg.pop("custom_text", False) or bool(text_cfg.get("hf_model_name"))
    if custom_text and "multimodal_cfg" in cfg:
        return CoCa(**cfg)  # CoCa always returns a dict
    return (CustomTextCLIP if custom_text else CLIP)(**cfg, output_dict=True)

"""`create_model`: one entry point for open_clip models, modx SSM models and exported checkpoints.

Named configs come from a registry, as in open_clip and timm: modx's JSON files in
`modx/models/model_configs/` first, then open_clip's own `model_configs`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
from open_clip.model import set_model_preprocess_cfg
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.utils import to_2tuple
from torch import nn

from modx.models.checkpoint import (
    CONFIG_FILE,
    OPEN_CLIP_CONFIG_FILE,
    ModelLoadError,
    adapt_state_dict,
    find_checkpoint,
    load_weights,
)
from modx.models.model import build_model
from modx.models.pooled import pool_last_block
from modx.models.text import allow_short_text

_log = logging.getLogger(__name__)
_CONFIG_PATHS = [Path(__file__).parent / "model_configs"]
_MODX_CONFIGS: dict[str, dict] = {}
LOCAL_DIR_PREFIX = "local-dir:"


def _scan_configs() -> None:
    _MODX_CONFIGS.clear()
    for root in _CONFIG_PATHS:
        paths = sorted(root.glob("*.json")) if root.is_dir() else [root] if root.is_file() else []
        for path in paths:
            _MODX_CONFIGS[path.stem] = json.loads(path.read_text())


_scan_configs()


def add_model_config(path: str | Path) -> None:
    """Register a JSON model config, or a directory of them, by file stem (as open_clip does)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model config path not found: {path}")
    _CONFIG_PATHS.append(path)
    _scan_configs()


def list_models() -> list[str]:
    """Bundled modx config names (open_clip's own names work too: `open_clip.list_models()`)."""
    return list(_MODX_CONFIGS)


def get_model_config(name: str) -> dict | None:
    """A named model config (modx's bundled ones first, then open_clip's), or None."""
    if name in _MODX_CONFIGS:
        return deepcopy(_MODX_CONFIGS[name])
    return open_clip.get_model_config(name.replace("/", "-"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read model config {path}: {e}") from e


def _spec_from_dir(directory: Path, random_init_without_weights: bool = False) -> dict:
    """{"name", "model_cfg", "preprocess_cfg", "weights"} of a modx export or open_clip local dir.

    With `random_init_without_weights` (the `local-dir:` form, as open_clip) a directory
    holding a config but no weights file gives weights None (random init) and a warning;
    otherwise a missing weights file is an error."""
    for fname in (CONFIG_FILE, OPEN_CLIP_CONFIG_FILE):
        if (directory / fname).is_file():
            cfg = _read_json(directory / fname)
            if "model_cfg" not in cfg:
                raise ModelLoadError(f"{directory / fname} has no 'model_cfg' key")
            try:
                weights = find_checkpoint(directory)
            except ModelLoadError as err:
                if not random_init_without_weights:
                    raise
                _log.warning("%s; building the model from %s with random weights", err, fname)
                weights = None
            return {"name": cfg.get("name", f"{LOCAL_DIR_PREFIX}{directory}"),
                    "model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {}),
                    "weights": weights}
    raise ModelLoadError(
        f"{directory} is not a model directory: it has neither {CONFIG_FILE} (modx export) "
        f"nor {OPEN_CLIP_CONFIG_FILE} (open_clip)")


def _spec_from_dict(cfg: dict, name: str | None) -> dict:
    cfg = deepcopy(cfg)
    if "model_cfg" in cfg:  # the export / open_clip_config.json layout
        return {"name": cfg.get("name", name), "model_cfg": cfg["model_cfg"],
                "preprocess_cfg": cfg.get("preprocess_cfg", {}), "weights": None}
    return {"name": name, "preprocess_cfg": cfg.pop("preprocess_cfg", {}), "model_cfg": cfg,
            "weights": None}


def resolve_spec(cfg_or_name: str | Path | dict) -> dict:
    """Where a model comes from: its name, model config, preprocess config and weights (if any)."""
    if isinstance(cfg_or_name, dict):
        return _spec_from_dict(cfg_or_name, None)
    text = str(cfg_or_name)
    if text.startswith(LOCAL_DIR_PREFIX):
        directory = Path(text[len(LOCAL_DIR_PREFIX):])
        if not directory.is_dir():
            raise ModelLoadError(f"'{LOCAL_DIR_PREFIX}' directory not found: {directory}")
        return _spec_from_dir(directory, random_init_without_weights=True)
    if text.startswith("hf-hub:"):
        raise ModelLoadError(f"{text}: modx never downloads; copy the model to a local directory "
                             f"and use '{LOCAL_DIR_PREFIX}PATH'")
    cfg = get_model_config(text)
    if cfg is not None:
        return _spec_from_dict(cfg, text)
    path = Path(text)
    if path.is_dir():
        return _spec_from_dir(path)
    if path.suffix == ".json" and path.is_file():
        return _spec_from_dict(_read_json(path), path.stem)
    raise ModelLoadError(
        f"unknown model {text!r}: not a bundled modx config ({', '.join(list_models())}), "
        "not an open_clip model name (open_clip.list_models()), not a model directory or JSON file")


def _merge(base: dict, override: dict) -> dict:
    out = deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def get_tokenizer(model_cfg: dict, name: str | None = None) -> Callable:
    """The tokenizer a model config implies: `tokenizer(list_of_str)` -> LongTensor (N, ctx)."""
    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    if name and "siglip" in name.lower() and open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name, context_length=context_length)
    return SimpleTokenizer(context_length=context_length, **kwargs)


def create_model(
        cfg_or_name: str | Path | dict,
        pretrained: str | Path | None = None,
        *,
        swap: dict[str, dict] | None = None,
        aug_cfg: dict[str, Any] | None = None,
        trust_torchscript: bool = False,
        **overrides: Any,
) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Build a CLIP model -> `(model, preprocess_train, preprocess_eval, tokenizer)`.

    cfg_or_name: a bundled modx config ("modx-tiny-s4d", see `list_models()`), an
        open_clip model name ("ViT-B-32"), "local-dir:PATH" or a directory (a modx
        export or an open_clip local dir), a JSON file, or a dict model config.
    pretrained: a local checkpoint file or directory (open_clip checkpoint, training
        checkpoint with "state_dict", safetensors, or a modx export, whose own config
        then defines the architecture). Never downloaded.
    swap: {"text" | "vision": tower config} replaces that tower after loading,
        keeping every other weight (see `swap_tower`); a dict config may carry it too.
    aug_cfg: open_clip augmentation config of the training transform.
    trust_torchscript: load a TorchScript archive (OpenAI's CLIP releases) as weights;
        loading one runs its code, so it is refused unless set.
    overrides: merged into the model config, e.g. `text_cfg={"context_length": 16}`.

    The model is open_clip's `CLIP` / `CustomTextCLIP` (or the subclass `ModxCLIP`) with
    output_dict=True; `model.modx_config` holds the resolved config for `export_model`, and
    `model.modx_weights` the weights file loaded (None: randomly initialised).
    """
    spec = resolve_spec(cfg_or_name)
    swap = {**spec["model_cfg"].pop("swap", {}), **(swap or {})}
    weights = spec["weights"]
    if pretrained is not None:
        pretrained = Path(pretrained)
        if not pretrained.exists():
            raise ModelLoadError(f"pretrained checkpoint not found: {pretrained} (modx loads local "
                                 "files only; open_clip tags such as 'openai' would need a download)")
        export_dir = pretrained if pretrained.is_dir() else pretrained.parent
        if (export_dir / CONFIG_FILE).is_file():
            exported = _spec_from_dir(export_dir)  # a modx export defines its own architecture
            if exported["model_cfg"] != spec["model_cfg"]:
                _log.warning("%s: using the architecture saved with the checkpoint, not %s's",
                             pretrained, spec["name"])
            spec = exported
        weights = find_checkpoint(pretrained) if pretrained.is_dir() else pretrained
    model_cfg = _merge(spec["model_cfg"], overrides)

    try:
        model = build_model(model_cfg, load_hf_weights=weights is None)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"invalid model config for {spec['name'] or 'dict config'}: {e}") from e
    if weights is not None:
        load_weights(model, weights, trust_torchscript)
    model.modx_config = {"name": spec["name"], "model_cfg": model_cfg,
                         "preprocess_cfg": spec["preprocess_cfg"]}
    model.modx_weights = None if weights is None else str(weights)
    _set_preprocess(model)
    for tower, tower_cfg in swap.items():
        model = swap_tower(model, tower, tower_cfg)
    allow_short_text(model)  # text batches may be cut to their longest caption (modx.models.text)
    pool_last_block(model)  # the last block computes only the pooled token's row (modx.models.pooled)
    return (model, *_transforms(model, aug_cfg), get_tokenizer(model.modx_config["model_cfg"],
                                                               spec["name"]))


def _set_preprocess(model: nn.Module) -> None:
    """open_clip's preprocess config on `model.visual`, sized to the vision tower's input."""
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), model.modx_config["preprocess_cfg"])
    if getattr(model.visual, "image_size", None) is not None:
        cfg["size"] = list(to_2tuple(model.visual.image_size))
    cfg = json.loads(json.dumps(cfg, default=list))  # tuples -> lists, as saved in JSON
    set_model_preprocess_cfg(model, cfg)
    model.modx_config["preprocess_cfg"] = cfg


def _transforms(model: nn.Module, aug_cfg: dict | None) -> tuple[Callable, Callable]:
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return (image_transform_v2(pp_cfg, is_train=True, aug_cfg=aug_cfg),
            image_transform_v2(pp_cfg, is_train=False))


_TOWER_KEYS = {"vision": ("vision_cfg", "visual."), "text": ("text_cfg", "text.")}
# What a new tower inherits from the one it replaces, so inputs keep their shape.
_INHERITED = {"vision": ("image_size", "patch_size"), "text": ("context_length", "vocab_size")}


def swap_tower(model: nn.Module, tower: str, tower_cfg: dict) -> nn.Module:
    """A new model whose `tower` ("text" or "vision") is built from `tower_cfg` (fresh weights)
    while the other tower and the logit scale keep `model`'s weights.

    `tower_cfg` is a tower config, e.g. {"backbone": "s4d", "width": 512, "layers": 6};
    for a text tower `context_length` and `vocab_size` default to the old tower's (the
    tokenizer stays), for a vision tower `image_size` and `patch_size`.
    """
    if tower not in _TOWER_KEYS:
        raise ValueError(f"tower must be one of {sorted(_TOWER_KEYS)}, got {tower!r}")
    if not hasattr(model, "modx_config"):
        raise ValueError("swap_tower needs a model made by modx.models.create_model (modx_config)")
    key, prefix = _TOWER_KEYS[tower]
    config = deepcopy(model.modx_config)
    old = config["model_cfg"][key]
    new = {k: old[k] for k in _INHERITED[tower] if k in old} | {"backbone": "transformer"} | tower_cfg
    config["model_cfg"][key] = new
    other_key = _TOWER_KEYS["text" if tower == "vision" else "vision"][0]
    config["model_cfg"][other_key].setdefault("backbone", "transformer")
    config["model_cfg"].pop("custom_text", None)
    # a new HF text tower starts from its local weights; a kept one is overwritten anyway
    new_model = build_model(config["model_cfg"], load_hf_weights=tower == "text")
    kept = {k: v for k, v in adapt_state_dict(new_model, dict(model.state_dict())).items()
            if not k.startswith(prefix)}
    missing, unexpected = new_model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise ModelLoadError(f"swap_tower({tower!r}): the kept weights do not fit; missing "
                             f"{[k for k in missing if not k.startswith(prefix)]}, "
                             f"unexpected {unexpected}")
    new_model.modx_config = config
    _set_preprocess(new_model)
    return new_model

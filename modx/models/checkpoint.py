"""Reading and writing model weights: open_clip checkpoints, safetensors, modx exports.

Only local files, only safe formats (`torch.load(weights_only=True)`, safetensors).
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from open_clip.convert import convert_state_dict
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed
from open_clip.transformer import VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modx.models.model import is_modx_config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
# The same preference as open_clip's `_find_checkpoint_in_dir`, modx's export first.
_PREFERRED_FILES = (
    WEIGHTS_FILE, "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "pytorch_model.bin",
    "pytorch_model.pth", "model.pth", "model.pt",
)
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


class ModelLoadError(ValueError):
    """A model config or checkpoint could not be used; the message names the file or keys."""


def find_checkpoint(directory: Path) -> Path:
    """The weights file of a checkpoint directory (modx export or open_clip / HF layout)."""
    for name in _PREFERRED_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt")
                        for p in directory.glob(ext))
    if not candidates:
        raise ModelLoadError(
            f"no weights file in {directory} (looked for {WEIGHTS_FILE}, *.safetensors, *.bin, "
            "*.pth, *.pt)")
    return candidates[0]


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip whose records include constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") for name in zf.namelist())


def read_state_dict(path: str | Path, trust_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or directory, unwrapped from a training checkpoint.

    Accepts a plain state dict, a training checkpoint `{"state_dict": ..., "epoch": ...}`
    (open_clip_train's format, `module.` prefixes from DDP), safetensors, or - only with
    `trust_torchscript` - a TorchScript archive (OpenAI's CLIP releases): loading one runs
    the code it holds, so it is refused by default (ModelLoadError naming the opt-in).
    """
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path), device="cpu")
        elif _is_torchscript(path):  # OpenAI's original CLIP checkpoints
            if not trust_torchscript:
                raise ModelLoadError(
                    f"{path} is a TorchScript archive: loading one runs the code it holds; if you trust "
                    "it, set model.trust_torchscript=true (--trust-torchscript for eval scripts, "
                    "create_model(..., trust_torchscript=True) in Python), or convert it to safetensors")
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(path, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                obj.pop(key, None)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise ModelLoadError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]} "
            "(modx reads safetensors and weights-only torch checkpoints)") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    for prefix in _STRIP_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def adapt_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply open_clip's checkpoint conversions (see open_clip.factory.load_checkpoint)."""
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)  # CLIP layout -> CustomTextCLIP (`text.`)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if name in sd and param is not None and param.ndim != sd[name].ndim:
            sd[name] = sd[name].reshape(param.shape)
    sd.pop("text.transformer.embeddings.position_ids", None)
    if isinstance(getattr(model, "visual", None), VisionTransformer):
        resize_pos_embed(sd, model)
    return sd


def load_weights(model: nn.Module, path: str | Path, trust_torchscript: bool = False) -> None:
    """Load a checkpoint into `model`; every key must match (else ModelLoadError naming them).
    `trust_torchscript`: see read_state_dict."""
    sd = adapt_state_dict(model, read_state_dict(path, trust_torchscript))
    expected = model.state_dict()
    for name, _ in model.named_buffers():  # non-persistent buffers (e.g. attn_mask) are rebuilt
        if name not in expected:
            sd.pop(name, None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong_shape = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        problems = [f"{label}: {show(keys)}" for label, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("shape mismatch", [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                                for k in wrong_shape]),
        ) if keys]
        raise ModelLoadError(
            f"checkpoint {path} does not match the model architecture; " + "; ".join(problems)
            + ". Check that the model name/config is the one the checkpoint was trained with.")
    model.load_state_dict(sd, strict=True)


def plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights of the bare architecture, as `create_model` builds it: `model.state_dict()`
    with every peft LoRA layer folded into its base layer (W + scale x B A, named as without
    the adapter) and the submodules marked `modx_export = False` (training aids a strategy
    attaches, e.g. C-CLIP's predictor) left out. A model without either: its state dict.
    `state`: the model's state gathered whole, in place of `model.state_dict()` (a sharded
    model's: modx.train.fsdp.full_state); the adapters are folded from its tensors."""
    whole = state
    state = model.state_dict() if state is None else dict(state)
    aids = [f"{name}." for name, m in model.named_modules() if name and getattr(m, "modx_export", True) is False]
    for name, layer in _lora_layers(model):
        for key in [k for k in state if k.startswith(f"{name}.")]:
            value = state.pop(key)
            if key.startswith(f"{name}.base_layer."):  # the base layer's tensors, renamed
                plain = f"{name}.{key[len(name) + len('.base_layer.'):]}"
                if plain == f"{name}.weight":
                    value = value + (_unmerged_delta(layer) if whole is None else _delta_of(layer, name, whole)).to(value)
                state[plain] = value
    return {k: v for k, v in state.items() if not any(k.startswith(a) for a in aids)}


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft, no adapters
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _unmerged_delta(layer: nn.Module) -> torch.Tensor:
    """The sum of the layer's active adapters' weight deltas not merged into its base yet."""
    delta = torch.zeros_like(layer.get_base_layer().weight)
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A and adapter not in layer.merged_adapters:
            delta = delta + layer.get_delta_weight(adapter).detach()
    return delta


def _delta_of(layer: nn.Module, name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """`_unmerged_delta` of the LoRA layer `name` from the tensors of a whole state dict."""
    from peft.utils.other import transpose

    delta = torch.zeros_like(state[f"{name}.base_layer.weight"])
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A and adapter not in layer.merged_adapters:
            b, a = state[f"{name}.lora_B.{adapter}.weight"], state[f"{name}.lora_A.{adapter}.weight"]
            delta = delta + transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[adapter]
    return delta


def export_model(model: nn.Module, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model.safetensors` + `model_config.json` (from `model.modx_config`) to `directory`.
    `state`: the model's state gathered whole, read instead of `model.state_dict()` (a
    sharded model's: modx.train.fsdp.full_state).

    `create_model(directory)` or `create_model(name, pretrained=directory)` rebuilds the
    model exactly (LoRA adapters merged, training aids left out: `plain_state_dict`).
    Plain open_clip architectures also get `open_clip_config.json`, so
    `open_clip.create_model("local-dir:DIR")` reads the export too.
    """
    while not hasattr(model, "modx_config") and hasattr(model, "module"):
        model = model.module  # DDP / Accelerate wrappers
    model = getattr(model, "_orig_mod", model)  # torch.compile
    config = getattr(model, "modx_config", None)
    if config is None:
        raise ValueError("model has no `modx_config`: create it with modx.models.create_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen: set[int] = set()
    for k, v in plain_state_dict(model, state).items():
        v = v.detach().cpu().contiguous()
        if v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "producer": "modx"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if not is_modx_config(config["model_cfg"]):
        open_clip_cfg = {k: config[k] for k in ("model_cfg", "preprocess_cfg")}
        (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(open_clip_cfg, indent=2) + "\n")
    return directory

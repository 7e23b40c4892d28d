"""Optimiser parameter groups: weight decay where open_clip applies it, SSM parameters apart."""

from __future__ import annotations

from torch import nn

_NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale", "logit_bias", "embedding", "cls_emb")


def is_ssm_parameter(param: nn.Parameter) -> bool:
    """SSM parameters (dt, A, B, ...) are tagged `_modx_ssm = True` by modx.models.ssm."""
    return bool(getattr(param, "_modx_ssm", False))


def ssm_parameter_lrs(model: nn.Module) -> dict[int, float | None]:
    """id(param) -> its layer's learning rate (None: the default) for every SSM parameter.

    Reads the tags and, for SSM blocks of modx towers, the `ssm_param_lrs` record that
    survives `copy.deepcopy` (which drops attributes set on Parameters).
    """
    found = {id(p): getattr(p, "_modx_ssm_lr", None) for p in model.parameters()
             if is_ssm_parameter(p)}
    for module in model.modules():
        for name, lr in getattr(module, "ssm_param_lrs", {}).items():
            found[id(module.get_parameter(name))] = lr
    return found


def _no_decay(name: str, param: nn.Parameter, extra: set[str]) -> bool:
    # open_clip_train's rule (p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name), plus
    # embeddings (token, positional, class; HF `embeddings`) and the model's no_weight_decay().
    return param.ndim < 2 or name in extra or any(s in name for s in _NO_DECAY_NAMES)


def model_param_groups(
        model: nn.Module,
        lr: float,
        weight_decay: float,
        ssm_lr: float | None = None,
        ssm_weight_decay: float = 0.0,
        decay_all: bool = False,
) -> list[dict]:
    """Parameter groups for torch.optim.AdamW.

    - "decay": weight matrices at `lr`, `weight_decay`;
    - "no_decay": norms, biases, embeddings, logit scale/bias at `lr`, no decay;
    - "ssm": parameters tagged `_modx_ssm` (dt, A, B) with `ssm_weight_decay` and the
      learning rate their layer was given (`ssm.lr` in the tower config), else `ssm_lr`,
      else min(lr, 1e-3) (PAPERS.md 3: SSM parameters want lr <= 1e-3).
    `decay_all`: every non-SSM parameter decays (the Mod-X authors' script decays all).
    Frozen parameters are left out, empty groups dropped; each group has a "name"
    (AdamW ignores it) and SSM groups with different learning rates are kept apart.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ssm_lrs = ssm_parameter_lrs(model)
    default_ssm_lr = min(lr, 1e-3) if ssm_lr is None else ssm_lr
    groups: dict[str, dict] = {
        "decay": {"name": "decay", "params": [], "lr": lr, "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "lr": lr, "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in ssm_lrs:
            p_lr = default_ssm_lr if ssm_lrs[id(param)] is None else ssm_lrs[id(param)]
            key = "ssm" if p_lr == default_ssm_lr else f"ssm@{p_lr:g}"
            groups.setdefault(key, {"name": key, "params": [], "lr": p_lr,
                                    "weight_decay": ssm_weight_decay})
        else:
            key = "no_decay" if not decay_all and _no_decay(name, param, extra) else "decay"
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]

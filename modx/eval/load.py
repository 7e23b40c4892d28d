"""Find and load the model an evaluation script is pointed at.

``--checkpoint`` may be a run directory (its newest ``checkpoints/phase-K/`` export),
an exported model directory (``model.safetensors`` + ``model_config.json``), or any
name ``modx.models.create_model`` accepts (open_clip name, modx config, JSON file),
optionally with local weights via ``--pretrained FILE``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

EXPORT_CONFIG = "model_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """The checkpoint argument names nothing loadable (the message says what to pass)."""


def resolve_checkpoint(checkpoint: str | Path) -> str:
    """The ``create_model`` argument for a run directory, export directory or model name."""
    path = Path(checkpoint)
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file():
            return str(path)
        phases = []
        for sub in (path / "checkpoints").glob("phase-*"):
            m = re.fullmatch(r"phase-(\d+)", sub.name)
            if m and (sub / EXPORT_CONFIG).is_file():
                phases.append((int(m.group(1)), sub))
        if not phases:
            raise CheckpointError(
                f"{path} holds no exported model: expected {path}/checkpoints/phase-K/"
                f"{EXPORT_CONFIG} (a run directory) or {path}/{EXPORT_CONFIG} (an export)"
            )
        return str(max(phases)[1])
    if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"{path} is a weights file without an architecture: pass the architecture and "
            f"the weights, e.g. --checkpoint modx-tiny-s4d --pretrained {path}"
        )
    return str(checkpoint)


def load_model(
    checkpoint: str | Path,
    pretrained: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Callable, Callable, str]:
    """-> (model in eval mode on ``device``, preprocess_eval, tokenizer, resolved source).

    Raises CheckpointError or modx.models.ModelLoadError (both ValueError) on bad input.
    """
    from modx.models import create_model

    source = resolve_checkpoint(checkpoint)
    model, _, preprocess, tokenizer = create_model(source, pretrained=pretrained)
    return model.to(device).eval(), preprocess, tokenizer, source

"""Find and load the model an evaluation script is pointed at.

``--checkpoint`` may be a run directory (its newest ``checkpoints/phase-K/`` export),
an exported model directory (``model.safetensors`` + ``model_config.json``), or any
name ``modx.models.create_model`` accepts (open_clip name, modx config, JSON file),
optionally with local weights via ``--pretrained FILE``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
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
    trust_torchscript: bool = False,
) -> tuple[nn.Module, Callable, Callable, str]:
    """-> (model in eval mode on ``device``, preprocess_eval, tokenizer, resolved source).

    Raises CheckpointError or modx.models.ModelLoadError (both ValueError) on bad input.
    """
    from modx.models import create_model

    source = resolve_checkpoint(checkpoint)
    model, _, preprocess, tokenizer = create_model(source, pretrained=pretrained, trust_torchscript=trust_torchscript)
    return model.to(device).eval(), preprocess, tokenizer, source


def model_arguments(description: str, data_help: tuple[str, str]) -> argparse.ArgumentParser:
    """The arguments every single-model evaluation script takes: --checkpoint, --pretrained,
    --data (metavar and help given), --batch-size, --workers, --device, --json."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_DIR_OR_NAME")
    p.add_argument("--pretrained", metavar="FILE", help="local weights for a model name")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="load a TorchScript --pretrained archive (loading one runs its code)")
    p.add_argument("--data", required=True, metavar=data_help[0], help=data_help[1])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def script_main(
    script: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], dict], table: Callable[[dict], str]
) -> int:
    """An evaluation script's main: `run(args)`, printed as JSON (`--json`) or as `table`; a
    user mistake (missing data, a checkpoint that names nothing, a bad value) is one line on
    stderr and exit status 2."""
    from modx.data import DataError

    try:
        result = run(args)
    except (DataError, ValueError, FileNotFoundError) as e:  # CheckpointError, ModelLoadError
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else table(result))
    return 0

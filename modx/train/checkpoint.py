"""Checkpoints of a run: resumable training states and exported per-phase models.

    checkpoints/state-00000120/   accelerator.save_state (model, optimiser, scheduler, RNG of
                                  every process) + trainer_state.json + strategy_<rank>.pt
    checkpoints/latest            name of the newest complete state
    checkpoints/phase-K/          modx.models.export_model: model.safetensors + model_config.json
    checkpoints/initial/          the same for the model before training

Every write goes to a temporary directory first and is renamed into place with os.replace,
so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

STATE_PREFIX = "state-"


def save_state(
    accelerator: Accelerator,
    root: Path,
    trainer_state: dict[str, Any],
    strategy_state: dict[str, Any],
    keep: int,
) -> Path:
    """Save a resumable state atomically (collective: every process must call it)."""
    name = f"{STATE_PREFIX}{trainer_state['global_step']:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(strategy_state, tmp / f"strategy_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", name)
        for old in sorted(root.glob(f"{STATE_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_latest(root: Path) -> Path | None:
    """The newest complete state under `root`, or None."""
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    complete = [p for p in sorted(root.glob(f"{STATE_PREFIX}*")) if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """{"phase", "phase_step", "global_step"} of a saved state."""
    return json.loads((path / "trainer_state.json").read_text())


def load_state(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and every RNG; return the strategy state.

    Call it last before training goes on: anything that draws random numbers afterwards
    (building a model, say) would move the RNG away from the saved run's.
    """
    accelerator.load_state(str(path))
    own = path / f"strategy_{accelerator.process_index}.pt"
    strategy_file = own if own.is_file() else path / "strategy_0.pt"  # world size changed
    return torch.load(strategy_file, map_location="cpu", weights_only=False)


def forget_states(root: Path) -> None:
    """Remove the resumable states (and probe embeddings) of an earlier run in `root`."""
    for path in [*root.glob(f"{STATE_PREFIX}*"), *root.glob(f".tmp-{STATE_PREFIX}*"), root / "probe"]:
        shutil.rmtree(path, ignore_errors=True)
    (root / "latest").unlink(missing_ok=True)


def export_phase(model: nn.Module, directory: Path) -> Path:
    """Export a usable model (modx.models.export_model) atomically to `directory`."""
    from modx.models import export_model

    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_model(model, tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Checkpoints of a run: resumable training states and exported per-phase models.

    checkpoints/state-00000120/   accelerator.save_state (model.safetensors, optimizer.bin,
                                  scheduler.bin; scaler.pt under fp16), or sharded (FSDP):
                                  shard_<rank>.{safetensors,json} (that process's shards of the
                                  model and the optimiser state, with the full shapes) +
                                  scheduler.{safetensors,json}; + rng_<rank>.{safetensors,json}
                                  (RNG of every process) + strategy_<rank>.{safetensors,json}
                                  (EWC Fisher) + replay.{tar,json} (the replay buffer: a
                                  WebDataset shard) + trainer_state.json
    checkpoints/latest            name of the newest complete state
    checkpoints/phase-K/          modx.models.export_model: model.safetensors + model_config.json
    checkpoints/initial/          the same for the model before training

Loading a checkpoint never runs code: everything is safetensors, JSON or a tar of samples
(read as bytes, never extracted) except the optimiser, scheduler and GradScaler files,
which are checked with `torch.load(weights_only=True)` before Accelerate reads them; a
state holding any other file (a pickle) is refused.
Every write goes to a temporary directory first and is renamed into place with
os.replace, so a run killed (or a disk filled) while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open
from torch import nn

from modx.train.faults import fault_point
from modx.train.fsdp import load_local_states, local_state
from modx.train.serialize import TreeError, load_tree, rng_state, save_tree, set_rng_state

STATE_PREFIX = "state-"
SHARD_PREFIX = "shard_"  # shard_<rank>.{safetensors,json}: one process's shards of a sharded (FSDP) run
TENSOR_FILES = (".bin",)  # written by accelerator.save_state; loaded with weights_only=True
SCALER_FILE = "scaler.pt"  # the fp16 GradScaler's state (accelerator.save_state): the same


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; names the path."""


def save_state(
    accelerator: Accelerator,
    root: Path,
    trainer_state: dict[str, Any],
    strategy_state: dict[str, Any],
    keep: int,
    write_main: Callable[[Path], None] | None = None,
    sharded: tuple[nn.Module, torch.optim.Optimizer, Any] | None = None,
) -> Path:
    """Save a resumable state atomically (collective: every process must call it).
    `write_main(directory)` adds files of the main process's (the replay buffer).
    `sharded`: (model, optimizer, scheduler) of an FSDP run, saved as every process's
    shards (modx.train.fsdp.local_state) instead of Accelerate's files.

    A failed write (full disk, unwritable directory) on any process removes the partial
    state and raises CheckpointError on every process; the previous state stays usable.
    """
    name = f"{STATE_PREFIX}{trainer_state['global_step']:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    rank = accelerator.process_index
    error = None
    try:
        if accelerator.is_main_process:
            for stale in root.glob(f".tmp-{STATE_PREFIX}*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as err:
        error = err
    _raise_on_any(accelerator, error, tmp)
    try:
        if sharded is not None:
            model, optimizer, scheduler = sharded
            save_tree(local_state(model, optimizer), tmp / f"{SHARD_PREFIX}{rank}")
            if accelerator.is_main_process:
                save_tree(scheduler.state_dict(), tmp / "scheduler")
                if accelerator.scaler is not None:  # fp16: the loss scale and its growth count
                    save_tree(accelerator.scaler.state_dict(), tmp / "scaler")
        else:
            accelerator.save_state(str(tmp))
            (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # saved below without pickle
        save_tree(rng_state(), tmp / f"rng_{rank}")
        fault_point("checkpoint")
        save_tree(strategy_state, tmp / f"strategy_{rank}")
        if accelerator.is_main_process:
            if write_main is not None:
                write_main(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save: RuntimeError on a full disk
        error = err
    _raise_on_any(accelerator, error, tmp)
    try:
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(root / "latest", name)
            for old in sorted(root.glob(f"{STATE_PREFIX}*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        error = err
    _raise_on_any(accelerator, error, final)
    return final


def _raise_on_any(accelerator: Accelerator, error: Exception | None, path: Path) -> None:
    """Raise CheckpointError on every process when the write failed on any (collective)."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return
    if accelerator.is_main_process and path.name.startswith(".tmp-"):
        shutil.rmtree(path, ignore_errors=True)
    latest = find_latest(path.parent)
    reason = error if error is not None else "failed on another process"
    free = shutil.disk_usage(path.parent).free / 2**20  # torch.save words a full disk obscurely
    raise CheckpointError(
        f"could not write checkpoint {path}: {reason} ({free:.0f} MiB free there); "
        f"the previous checkpoint ({latest or 'none'}) is intact: free disk space or fix "
        "permissions, then resume with --resume"
    )


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
    """{"phase", "phase_step", "global_step", ...} of a saved state."""
    return json.loads((path / "trainer_state.json").read_text())


def load_state(
    accelerator: Accelerator, path: Path, sharded: tuple[nn.Module, torch.optim.Optimizer, Any] | None = None
) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and every RNG; return the strategy state.
    `sharded`: (model, optimizer, scheduler) of an FSDP run; its state may have been saved
    with another number of processes (the shards are put together and sharded anew).

    Refuses (CheckpointError naming the file) a state with a file that could run code
    when loaded. Call it last before training goes on: anything that draws random numbers
    afterwards (building a model, say) would move the RNG away from the saved run's.
    """
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if (path / DEEPSPEED_DIR).is_dir() != deepspeed:
        raise CheckpointError(
            f"cannot resume from {path}: it was saved " + ("under DeepSpeed; launch with DeepSpeed again"
            if not deepspeed else "without DeepSpeed; launch as it was saved") + " (or start a new run "
            "from a phase export with model.pretrained)")
    check_loadable(path, deepspeed=deepspeed)
    rank = accelerator.process_index
    own = rank if (path / f"strategy_{rank}.json").is_file() else 0  # world size changed
    try:
        strategy_state = load_tree(path / f"strategy_{own}")
        rng = load_tree(path / f"rng_{own}")
    except TreeError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None
    saved_sharded = (path / f"{SHARD_PREFIX}0.json").is_file()
    if saved_sharded != (sharded is not None):
        how = ("sharded (FSDP): resume it with `accelerate launch --use_fsdp --fsdp_version 2`" if saved_sharded
               else "unsharded: resume it without --use_fsdp")
        raise CheckpointError(f"cannot resume from {path}: it was saved {how}")
    if sharded is not None:
        _load_sharded(path, *sharded, scaler=accelerator.scaler)
    else:
        accelerator.load_state(str(path))
    set_rng_state(rng)
    return strategy_state


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  scaler: torch.amp.GradScaler | None = None) -> None:
    try:
        first = load_tree(path / f"{SHARD_PREFIX}0")
        states = [first] + [load_tree(path / f"{SHARD_PREFIX}{r}") for r in range(1, first["world_size"])]
        scheduler.load_state_dict(load_tree(path / "scheduler"))
        if scaler is not None and (path / "scaler.json").is_file():
            scaler.load_state_dict(load_tree(path / "scaler"))
    except TreeError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from None
    load_local_states(model, optimizer, states)


DEEPSPEED_DIR = "pytorch_model"  # Accelerate's DeepSpeed checkpoint (engine.save_checkpoint) in a state
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed's converters, written, never run


def check_loadable(path: Path, deepspeed: bool = False) -> None:
    """Raise CheckpointError unless every file of the state at `path` loads without
    running code: safetensors and JSON as they are, Accelerate's .bin files and scaler.pt
    with torch.load(weights_only=True), nothing else (pickles are never loaded). A DeepSpeed
    state's `pytorch_model/*.pt` are checked the same way, with DeepSpeed's plain data
    classes (its loss scaler, ZeRO stage, fragment addresses) allowed."""
    for file in sorted(path.iterdir()):
        if file.suffix == ".json":
            continue
        if file.is_dir() and file.name == DEEPSPEED_DIR and not deepspeed:
            continue  # a DeepSpeed state resumed without DeepSpeed: Accelerate does not read it
        if file.is_dir() and file.name == DEEPSPEED_DIR:
            _check_deepspeed(path, file)
            continue
        if file.is_dir():
            continue
        if deepspeed and (file.name in DEEPSPEED_SCRIPTS or file.name == "latest"):
            continue  # DeepSpeed's tag pointer (text) and converter scripts: never loaded
        if file.suffix == ".tar":  # samples (the replay buffer): read as bytes, never extracted
            if not tarfile.is_tarfile(file):
                raise CheckpointError(f"cannot resume from {path}: {file.name} is not a valid tar file")
            continue
        if file.suffix == ".safetensors":
            try:
                safe_open(str(file), framework="pt").keys()  # reads the header only
            except (OSError, SafetensorError) as err:
                raise CheckpointError(f"cannot resume from {path}: {file.name} is not a valid safetensors file ({err})") from None
            continue
        if file.suffix not in TENSOR_FILES and file.name != SCALER_FILE:
            raise CheckpointError(
                f"refusing to resume from {path}: {file.name} is not a safetensors, JSON or "
                "optimiser file (modx never loads pickles; remove the file if you trust it is "
                "not needed, or resume from another checkpoint)"
            )
        _check_tensors(file)


def _check_tensors(file: Path, allowed: Sequence[type] = ()) -> None:
    """CheckpointError unless `file` loads with torch.load(weights_only=True) (`allowed`:
    classes the restricted unpickler may build besides tensors and containers)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        unsupported = re.search(r"GLOBAL [\w.]+", text)  # what the file would build: the reason
        raise CheckpointError(
            f"refusing to load {file}: it does not load as plain tensors "
            f"(torch.load weights_only=True: {first}{f' ({unsupported.group(0)})' if unsupported else ''}); "
            "it may run code - resume from another checkpoint"
        ) from None


def _check_deepspeed(path: Path, directory: Path) -> None:
    """DeepSpeed's model and ZeRO optimiser files (`*.pt`), each with weights_only=True."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        raise CheckpointError(f"cannot resume from {path}: it is a DeepSpeed state and DeepSpeed is not "
                              "installed (pip install deepspeed)") from None
    allowed = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
    for file in sorted(directory.iterdir()):
        if file.suffix != ".pt":
            raise CheckpointError(f"refusing to resume from {path}: {DEEPSPEED_DIR}/{file.name} is not a "
                                  "DeepSpeed tensor file (modx never loads pickles)")
        _check_tensors(file, allowed)


def forget_states(root: Path) -> None:
    """Remove the resumable states (and probe embeddings) of an earlier run in `root`."""
    for path in [*root.glob(f"{STATE_PREFIX}*"), *root.glob(f".tmp-{STATE_PREFIX}*"), root / "probe"]:
        shutil.rmtree(path, ignore_errors=True)
    (root / "latest").unlink(missing_ok=True)


def export_phase(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Export a usable model (modx.models.export_model) atomically to `directory`; `state`:
    its whole weights when the model is sharded (modx.train.fsdp.full_state)."""
    from modx.models import export_model

    tmp = directory.with_name(f".tmp-{directory.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        export_model(model, tmp, state=state)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not export the model to {directory}: {err}") from None
    return directory


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Nested state as safetensors + JSON, never pickle: what a checkpoint holds besides
Accelerate's files (a strategy's state, a replay buffer, the RNG of a process).

    save_tree({"fisher": {"w": t}, "seen": 3}, dir / "strategy_0")
      -> strategy_0.safetensors  {"/fisher/w": t}
         strategy_0.json         {"fisher": {"w": {"__tensor__": "/fisher/w"}}, "seen": 3}

Loading either file cannot run code: safetensors holds only tensors, JSON only data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class TreeError(ValueError):
    """A saved tree that cannot be read (missing, truncated or malformed files)."""


def save_tree(tree: Any, stem: Path) -> None:
    """Write nested dicts/lists of tensors, numbers and strings as `stem`.safetensors (the
    tensors) + `stem`.json (the rest, tensors replaced by {"__tensor__": key})."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(tree, "", tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(skeleton))


def load_tree(stem: Path) -> Any:
    """The tree `save_tree` wrote to `stem` (TreeError naming the files if unreadable)."""
    try:
        tensors = load_file(str(stem.with_suffix(".safetensors")))
        skeleton = json.loads(stem.with_suffix(".json").read_text())
        return _join(skeleton, tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise TreeError(f"cannot read {stem}.safetensors/.json: {err!r}") from None


def _split(tree: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(tree):
        tensors[key] = tree.detach().to("cpu", copy=True).contiguous()  # no shared storage
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {str(k): _split(v, f"{key}/{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot checkpoint {type(tree).__name__} at {key!r}: use tensors, numbers, strings, lists, dicts")


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states of this process, as tensors and numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Continual-learning summaries of a phase x eval-set recall matrix.

Notation: a[i][j] = recall on eval set j after training phase i (phase i trains on
the data of eval set j = i), T = number of phases done, b[j] = recall of the
initial model (before phase 0) on set j.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


def continual_metrics(
    R: Sequence[Sequence[float]] | np.ndarray,
    initial: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Average, last, backward/forward transfer and forgetting (GEM / Chaudhry et al.).

    R has shape (T, S) with T phases done and S >= T eval sets (square once the
    stream is finished); ``initial`` has length S. Definitions:
    - average_recall = 1/T sum_{j<T} a[T-1][j]  (ACC; Lopez-Paz & Ranzato 2017, GEM)
    - last_recall[j] = a[T-1][j] for every set j
    - learned_recall[j] = a[j][j], recall on set j right after learning it
    - backward_transfer = 1/(T-1) sum_{j<T-1} (a[T-1][j] - a[j][j])  (BWT, GEM)
    - forgetting_per_set[j] = max_{l<T-1} a[l][j] - a[T-1][j] for j < T-1, and
      forgetting = their mean  (Chaudhry et al. 2018, "Riemannian Walk")
    - forward_transfer = 1/(T-1) sum_{j=1}^{T-1} (a[j-1][j] - b[j])  (FWT, GEM;
      needs ``initial``)
    Undefined values (T = 1, no initial, a missing NaN cell) are None, so the dict
    is JSON-ready as it is.
    """
    a = np.asarray(R, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[0] > a.shape[1]:
        raise ValueError(
            f"R must be (phases, eval sets) with phases <= eval sets, got shape {a.shape}"
        )
    t = a.shape[0]
    b = None if initial is None else np.asarray(initial, dtype=np.float64)
    if b is not None and b.shape != (a.shape[1],):
        raise ValueError(f"initial must have {a.shape[1]} values (one per eval set), got {b.shape}")
    last = a[t - 1]
    learned = np.diagonal(a)  # (T,)
    forgetting = a[: t - 1, : t - 1].max(axis=0) - last[: t - 1] if t > 1 else np.array([])
    fwt = None
    if b is not None and t > 1:
        fwt = np.mean([a[j - 1, j] - b[j] for j in range(1, t)])
    return {
        "n_phases": t,
        "n_eval_sets": int(a.shape[1]),
        "average_recall": _num(last[:t].mean()),
        "last_recall": [_num(x) for x in last],
        "learned_recall": [_num(x) for x in learned],
        "backward_transfer": _num((last[: t - 1] - learned[: t - 1]).mean()) if t > 1 else None,
        "forgetting": _num(forgetting.mean()) if t > 1 else None,
        "forgetting_per_set": [_num(x) for x in forgetting],
        "forward_transfer": _num(fwt),
    }


class RecallMatrix(NamedTuple):
    """Recall table built from results.jsonl records."""

    values: list[list[float]]  # (phases, eval sets); NaN where no record
    initial: list[float] | None  # phase -1 row, or None when the run has none
    phases: list[str]  # phase names, in phase order
    eval_sets: list[str]  # eval set names, in eval_index order


def recall_matrix(
    records: Iterable[Mapping[str, Any]], metric: str = "mean_recall"
) -> RecallMatrix:
    """Arrange results.jsonl records ({"phase", "phase_name", "eval_set", "eval_index",
    "metrics"}) as a phase x eval-set matrix of ``metrics[metric]``. Phase -1 is the
    initial model. A later record for the same cell replaces an earlier one (resume)."""
    cells: dict[tuple[int, int], float] = {}
    phases: dict[int, str] = {}
    sets: dict[int, str] = {}
    for rec in records:
        p, j = int(rec["phase"]), int(rec["eval_index"])
        phases[p] = str(rec.get("phase_name", p))
        sets[j] = str(rec["eval_set"])
        cells[(p, j)] = float(rec["metrics"].get(metric, math.nan))
    set_idx = sorted(sets)
    trained = sorted(p for p in phases if p >= 0)

    def row(p: int) -> list[float]:
        return [cells.get((p, j), math.nan) for j in set_idx]

    return RecallMatrix(
        values=[row(p) for p in trained],
        initial=row(-1) if -1 in phases else None,
        phases=[phases[p] for p in trained],
        eval_sets=[sets[j] for j in set_idx],
    )


def _num(x: float | np.floating | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)

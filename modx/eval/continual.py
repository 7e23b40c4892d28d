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
    held_out: tuple[bool, ...] = ()  # per eval set: a held-out set (eval.retrieval), not a phase's

    def columns(self, held_out: bool) -> RecallMatrix:
        """The stream's own columns (``held_out=False``: what continual_metrics scores) or
        the held-out sets' columns."""
        flags = self.held_out or (False,) * len(self.eval_sets)
        keep = [j for j, h in enumerate(flags) if h == held_out]
        return RecallMatrix(
            values=[[row[j] for j in keep] for row in self.values],
            initial=None if self.initial is None else [self.initial[j] for j in keep],
            phases=self.phases,
            eval_sets=[self.eval_sets[j] for j in keep],
            held_out=(held_out,) * len(keep),
        )


def is_phase_retrieval(rec: Mapping[str, Any]) -> bool:
    """A results.jsonl record of retrieval at a phase end (not zero-shot, not inside a phase)."""
    return rec.get("kind", "retrieval") == "retrieval" and not rec.get("in_phase", False)


def recall_matrix(
    records: Iterable[Mapping[str, Any]], metric: str = "mean_recall", kind: str = "retrieval"
) -> RecallMatrix:
    """Arrange results.jsonl records ({"phase", "phase_name", "eval_set", "eval_index",
    "metrics"}) as a phase x eval-set matrix of ``metrics[metric]``. Phase -1 is the
    initial model. A later record for the same cell replaces an earlier one (resume).
    Only phase-end records of ``kind`` count: ``"retrieval"`` (the eval sets; held-out
    sets, ``"held_out": true``, are columns flagged in ``held_out``) or ``"val"`` (the
    phases' validation sets, ``eval_index`` = the phase index)."""
    cells: dict[tuple[int, int], float] = {}
    phases: dict[int, str] = {}
    sets: dict[int, str] = {}
    held: dict[int, bool] = {}
    for rec in records:
        if rec.get("kind", "retrieval") != kind or rec.get("in_phase", False):
            continue
        p, j = int(rec["phase"]), int(rec["eval_index"])
        phases[p] = str(rec.get("phase_name", p))
        sets[j] = str(rec["eval_set"])
        held[j] = bool(rec.get("held_out", False))
        cells[(p, j)] = _cell(rec["metrics"].get(metric))
    set_idx = sorted(sets)
    trained = sorted(p for p in phases if p >= 0)

    def row(p: int) -> list[float]:
        return [cells.get((p, j), math.nan) for j in set_idx]

    return RecallMatrix(
        values=[row(p) for p in trained],
        initial=row(-1) if -1 in phases else None,
        phases=[phases[p] for p in trained],
        eval_sets=[sets[j] for j in set_idx],
        held_out=tuple(held[j] for j in set_idx),
    )


RANDOM_START = ("the initial model has random weights: its zero-shot accuracy is chance, and accuracy "
                "kept relative to chance means nothing. Set eval.retention_from to a phase that trains "
                "the zero-shot sets' domains (e.g. the first), or start from pretrained weights")


def zeroshot_retention(
    records: Iterable[Mapping[str, Any]], metric: str = "acc1", reference: str = "initial"
) -> dict[str, Any] | None:
    """Zero-shot accuracy after every phase relative to a reference model, from the
    phase-end ``"kind": "zeroshot"`` records (None when there are none):
    - matrix[i][j] = accuracy on zero-shot set j after phase i, initial[j] = before phase 0
    - reference: ``"initial"`` (the model before phase 0) or a phase name (the model after
      that phase, e.g. a broad first phase standing for pretraining); reference_accuracy[j]
      its accuracy
    - retention[i][j] = 100 * matrix[i][j] / reference_accuracy[j] (percent of the
      reference's accuracy kept; None for phases before the reference, or when the
      reference's accuracy is missing or 0)
    - mean_retention = mean of the last row of retention over the sets (None if undefined)
    - omitted: why retention is not given (None when it is): an initial reference whose
      records say ``"random_init": true`` or that was not evaluated, or no evaluation
      after the reference phase.
    """
    cells: dict[tuple[int, str], float] = {}
    phases: dict[int, str] = {}
    sets: dict[str, int] = {}
    random_init = False
    for rec in records:
        if rec.get("kind") != "zeroshot" or rec.get("in_phase", False):
            continue
        p, name = int(rec["phase"]), str(rec["eval_set"])
        phases[p] = str(rec.get("phase_name", p))
        sets[name] = int(rec.get("eval_index", len(sets)))
        cells[(p, name)] = _cell(rec["metrics"].get(metric))
        random_init = random_init or (p == -1 and bool(rec.get("random_init")))
    if not cells:
        return None
    names = sorted(sets, key=sets.__getitem__)
    trained = sorted(p for p in phases if p >= 0)
    initial = [_num(cells.get((-1, s), math.nan)) for s in names] if -1 in phases else None
    matrix = [[_num(cells.get((p, s), math.nan)) for s in names] for p in trained]
    by_name = {phases[p]: p for p in trained}
    omitted = None
    if reference == "initial":
        ref_phase, base = -1, initial
        if random_init:
            omitted = RANDOM_START
        elif initial is None:
            omitted = "the initial model was not evaluated (eval.initial: false)"
    else:
        ref_phase = by_name.get(reference)
        base = matrix[trained.index(ref_phase)] if ref_phase is not None else None
        if ref_phase is None:
            omitted = f"no zero-shot evaluation after the reference phase {reference!r} (eval.retention_from)"

    def kept(p: int, value: float | None, b: float | None) -> float | None:
        return None if omitted or p < ref_phase or value is None or not b else 100.0 * value / b

    retention = [[kept(p, v, b) for v, b in zip(row, base or [None] * len(names))] for p, row in zip(trained, matrix)]
    last = [r for r in retention[-1] if r is not None] if retention else []
    return {
        "metric": metric,
        "eval_sets": names,
        "phases": [phases[p] for p in trained],
        "initial": initial,
        "matrix": matrix,
        "reference": reference,
        "reference_accuracy": base,
        "retention": retention,
        "mean_retention": _num(float(np.mean(last))) if last and len(last) == len(names) else None,
        "omitted": omitted,
    }


def _cell(x: float | None) -> float:
    """A metric read from results.jsonl as a float; an undefined one (null) is NaN."""
    return math.nan if x is None else float(x)


def retention_reference(zs: Mapping[str, Any]) -> str:
    """The model a ``zeroshot_retention`` result is relative to, in words."""
    ref = zs.get("reference", "initial")
    return "the initial model" if ref == "initial" else f"the model after phase '{ref}'"


def _num(x: float | np.floating | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)

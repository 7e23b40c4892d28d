"""Spatial disorder between two model versions (PAPERS.md section 2; Mod-X, Ni et al. 2023).

Inputs: a fixed probe of n image-text pairs embedded by the old model (U, V) and by
the new model (U', V'), shape (n, d). Rows are L2-normalised here, everything is
computed in float64, angles are in degrees, arccos arguments are clipped to [-1, 1].
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_CHUNK_ELEMENTS = 1 << 22  # float64 entries of an angle-matrix block (32 MiB)


def spatial_disorder(
    img_old: ArrayLike,
    txt_old: ArrayLike,
    img_new: ArrayLike,
    txt_new: ArrayLike,
    *,
    bins: int = 180,
) -> dict[str, Any]:
    """Intra-modal rotation and inter-modal deviation, exactly as PAPERS.md section 2.

    - rotation_{image,text}_deg: mean over samples of theta_i = arccos(<z_i, z'_i>)
      (+ ``_median``, ``_p90`` and a histogram on ``bins`` equal bins over [0, 180]).
    - topology_drift_{image,text}_deg: mean over i != j of |SAM'_ij - SAM_ij|,
      SAM = arccos(Z Z^T).
    - rigid_fraction_{image,text}: 1 - ||Z R - Z'||^2 / ||Z - Z'||^2 with R the
      orthogonal Procrustes solution of min ||Z R - Z'||_F (1 when Z' == Z).
    - deviation_async_deg: mean_i |theta_i(image) - theta_i(text)|.
    - deviation_relative_rotation_deg: arccos(tr(R_img R_txt^T) / d).
    - alignment_change_deg: mean_i (phi'_i - phi_i), phi_i = arccos(<u_i, v_i>).
    - alignment_flip_{i2t,t2i}: among pairs whose top-1 retrieval the old model gets
      right, the fraction the new model gets wrong (0 when the old model gets none
      right; ``n_correct_old_*``, the expected number right, gives the denominators).
      Ties follow the retrieval tie rule, broken at random in expectation: a pair with
      no item above its match and t items tied with it (scores within float64
      rounding) is right with probability 1 / (t + 1). One random order breaks the
      ties of both models, so the flip fraction is
      sum_i (P(right_old_i) - P(right_old_i and right_new_i)) / sum_i P(right_old_i),
      with P(both) = 1 / (|T_old u T_new| + 1) when neither model has an item above
      the match (T: the tied items); an unchanged model flips nothing, ties or not.
    The Procrustes rotation is unique only when the probe spans all d dimensions
    (n >= d); otherwise a warning is issued and the relative rotation is one of many.
    """
    u, v, u2, v2 = (
        _unit64(x, name)
        for x, name in (
            (img_old, "img_old"),
            (txt_old, "txt_old"),
            (img_new, "img_new"),
            (txt_new, "txt_new"),
        )
    )
    if not (u.shape == v.shape == u2.shape == v2.shape) or u.shape[0] < 2:
        raise ValueError(
            "spatial_disorder needs four (n, d) arrays of one shape with n >= 2, got "
            f"{u.shape}, {v.shape}, {u2.shape}, {v2.shape}"
        )
    n, d = u.shape
    edges = np.linspace(0.0, 180.0, bins + 1)
    out: dict[str, Any] = {"n_probe": n, "dim": d}
    theta = {}
    rotations = {}
    for name, z, z2 in (("image", u, u2), ("text", v, v2)):
        theta[name] = _angle_deg((z * z2).sum(1))  # (n,)
        out[f"rotation_{name}_deg"] = float(theta[name].mean())
        out[f"rotation_{name}_deg_median"] = float(np.median(theta[name]))
        out[f"rotation_{name}_deg_p90"] = float(np.percentile(theta[name], 90))
        out[f"rotation_{name}_hist"] = np.histogram(theta[name], edges)[0].tolist()
        out[f"topology_drift_{name}_deg"] = topology_drift_deg(z, z2)
        rotations[name], out[f"rigid_fraction_{name}"] = procrustes(z, z2)
    out["rotation_hist_edges_deg"] = edges.tolist()
    out["deviation_async_deg"] = float(np.abs(theta["image"] - theta["text"]).mean())
    rel = np.trace(rotations["image"] @ rotations["text"].T) / d
    out["deviation_relative_rotation_deg"] = float(_angle_deg(np.asarray(rel)))
    phi_old, phi_new = _angle_deg((u * v).sum(1)), _angle_deg((u2 * v2).sum(1))
    out["alignment_old_deg"] = float(phi_old.mean())
    out["alignment_new_deg"] = float(phi_new.mean())
    out["alignment_change_deg"] = float((phi_new - phi_old).mean())
    for name, q, g, q2, g2 in (("i2t", u, v, u2, v2), ("t2i", v, u, v2, u2)):
        right_old, right_both = top1_right_probability(q, g, q2, g2)
        n_right = float(right_old.sum())
        out[f"n_correct_old_{name}"] = n_right
        flips = float((right_old - right_both).sum())
        out[f"alignment_flip_{name}"] = flips / n_right if n_right > 0 else 0.0
    return out


def topology_drift_deg(z: np.ndarray, z2: np.ndarray) -> float:
    """Mean over i != j of |arccos(<z'_i, z'_j>) - arccos(<z_i, z_j>)| in degrees,
    computed in row blocks so the n x n angle matrices never exist at once."""
    n = z.shape[0]
    total = 0.0
    rows = max(1, _CHUNK_ELEMENTS // n)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        diff = np.abs(_angle_deg(z2[s:e] @ z2.T) - _angle_deg(z[s:e] @ z.T))  # (e-s, n)
        diff[np.arange(e - s), np.arange(s, e)] = 0.0  # i == j is not a pair
        total += diff.sum()
    return float(total / (n * (n - 1)))


def procrustes(z: np.ndarray, z2: np.ndarray) -> tuple[np.ndarray, float]:
    """Orthogonal Procrustes R = argmin_{R^T R = I} ||Z R - Z'||_F (R = W X^T from
    the SVD Z^T Z' = W S X^T; Schoenemann 1966) and the rigid fraction
    1 - ||Z R - Z'||^2 / ||Z - Z'||^2 (in [0, 1] since I is feasible; 1 when Z' == Z,
    taken as every row moving by less than 1e-12, float64 rounding noise)."""
    w, s, xt = np.linalg.svd(z.T @ z2)  # (d, d)
    if s[-1] <= 1e-10 * max(s[0], 1e-300):
        warnings.warn(
            f"probe of {z.shape[0]} samples does not span all {z.shape[1]} dimensions: the "
            "Procrustes rotation is not unique (use a probe with n >= d)",
            stacklevel=3,
        )
    r = w @ xt
    denom = float(((z - z2) ** 2).sum())
    if denom <= z.shape[0] * 1e-24:
        return r, 1.0
    resid = float(((z @ r - z2) ** 2).sum())
    return r, float(np.clip(1.0 - resid / denom, 0.0, 1.0))


def top1_right_probability(
    q: np.ndarray, g: np.ndarray, q2: np.ndarray, g2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(n,) P(query i's match g_i is top 1 under the old model (q, g)) and P(top 1 under
    both the old and the new model (q2, g2)), ties broken by one uniformly random order
    of the items shared by both models (the retrieval tie rule of modx.eval.retrieval).
    Old: 0 if some g_j scores above the match, else 1 / (t + 1) with t items tied;
    both: 0 if either model has an item above, else 1 / (|T_old u T_new| + 1). A
    difference within the float64 matmul error bound d * 2^-52 (unit rows) is a tie,
    so duplicate rows tie exactly. In row blocks."""
    n, d = q.shape
    tol = d * 2.0**-52
    right_old, right_both = np.empty(n), np.empty(n)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        diag = (np.arange(e - s), np.arange(s, e))
        above, tied = [], []
        for a, b in ((q, g), (q2, g2)):
            scores = a[s:e] @ b.T  # (e-s, n)
            pos = scores[diag][:, None]
            above.append((scores > pos + tol).any(1))
            tie = np.abs(scores - pos) <= tol
            tie[diag] = False  # the match itself
            tied.append(tie)
        right_old[s:e] = np.where(above[0], 0.0, 1.0 / (tied[0].sum(1) + 1))
        both = 1.0 / ((tied[0] | tied[1]).sum(1) + 1)
        right_both[s:e] = np.where(above[0] | above[1], 0.0, both)
    return right_old, right_both


def _unit64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norm == 0):
        raise ValueError(f"{name} has a zero, NaN or inf row; cannot normalise")
    return x / norm


def _angle_deg(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))

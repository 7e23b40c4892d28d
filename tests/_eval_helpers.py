"""Synthetic run directories (results.jsonl, disorder.jsonl, config.yaml) for report tests
and the example figures in docs/figures/report_*.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.linalg import expm

from modx.eval.disorder import spatial_disorder
from modx.eval.retrieval import retrieval_metrics

DOMAINS = ("digits", "textiles", "shapes")


def _rotation(rng: np.random.Generator, d: int, size: float) -> np.ndarray:
    skew = rng.standard_normal((d, d))
    return expm(size * (skew - skew.T) / np.sqrt(d))


def make_run(
    path: Path, strategy: str = "modx", drift: float = 0.1, seed: int = 0, n: int = 120
) -> Path:
    """A 3-phase run whose embeddings drift by random rotations of size ``drift`` per
    phase (the text space drifts half as much: inter-modal deviation). Phase j "learns"
    domain j by moving its captions onto their images; later drift then undoes that.
    Recall and SD are computed from these embeddings with the real metric functions."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(f"strategy: {{name: {strategy}}}\nmodel: {{arch: tiny}}\n")
    d = 16
    base = {s: rng.standard_normal((n, d)) for s in DOMAINS}
    pairs = {s: (b, b + 0.9 * rng.standard_normal((n, d))) for s, b in base.items()}
    rot_img, rot_txt = np.eye(d), np.eye(d)
    history = []
    results, disorder = [], []
    for phase in range(-1, len(DOMAINS)):
        if phase >= 0:
            rot_img = rot_img @ _rotation(rng, d, drift)
            rot_txt = rot_txt @ _rotation(rng, d, drift / 2)
            u, v = pairs[DOMAINS[phase]]
            pairs[DOMAINS[phase]] = (u, (0.3 * v @ rot_txt + u @ rot_img) @ rot_txt.T)
        emb = {s: (u @ rot_img, v @ rot_txt) for s, (u, v) in pairs.items()}
        name = "initial" if phase < 0 else DOMAINS[phase]
        for j, s in enumerate(DOMAINS):
            m = retrieval_metrics(*emb[s], np.arange(n), backend="torch")
            m.update(n_images=n, n_texts=n)
            results.append({"phase": phase, "phase_name": name, "eval_set": s, "eval_index": j,
                            "step": 10 * (phase + 1), "metrics": m})  # fmt: skip
        if phase >= 0:
            for reference, old in (("previous", history[-1]), ("initial", history[0])):
                for s in DOMAINS:
                    sd = spatial_disorder(*old[s], *emb[s])
                    disorder.append({"phase": phase, "phase_name": name, "eval_set": s,
                                     "reference": reference, "metrics": sd})  # fmt: skip
        history.append(emb)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (path / "disorder.jsonl").write_text("".join(json.dumps(r) + "\n" for r in disorder))
    return path

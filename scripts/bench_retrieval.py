"""Benchmark modx.eval.retrieval_metrics: time and peak memory of the faiss and torch
backends at a few gallery sizes (synthetic unit vectors, several captions per image).

    python scripts/bench_retrieval.py                       # 10k and 100k captions, d=512
    python scripts/bench_retrieval.py --sizes 10000 --json bench.json
    python scripts/bench_retrieval.py --large --json big.json   # 100k images x 500k captions, d=256
    python scripts/bench_retrieval.py --sizes 100000 --dim 256 --backends faiss --before HEAD~1
    python scripts/bench_retrieval.py --bands --dim 256   # pairs a bfloat16 first pass must rescore
                                      # the same data in one process: code at git REV, then now

Each (backend, size) runs in a fresh process so that its peak resident memory can be
measured; "extra peak" is the peak RSS during the call minus the RSS before it (the
embeddings themselves excluded). "full matrix" is what an N x M float32 similarity
matrix would take. Prints a table; --json writes the rows as JSON. ``--before REV`` also
times ``modx/eval/retrieval.py`` as of git revision REV in the same process, on the same
data, before the current code (rows "BACKEND@REV"), for a side-by-side under one load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def synthetic(n_texts: int, per_image: int, dim: int, seed: int = 0):
    """Unit image vectors; each caption is its image plus noise, renormalised."""
    rng = np.random.default_rng(seed)
    n_images = -(-n_texts // per_image)  # the last image has fewer captions if n_texts % per_image
    img = rng.standard_normal((n_images, dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    ids = np.arange(n_texts) // per_image
    txt = rng.standard_normal((n_texts, dim), dtype=np.float32)
    txt *= 8.0 / np.sqrt(dim)  # noise norm 8: caption-image cosine about 0.12
    txt += img[ids]
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, ids


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _module_at(rev: str):
    """modx/eval/retrieval.py as of git revision ``rev``, imported as a separate module."""
    import importlib.util
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = subprocess.run(["git", "-C", root, "show", f"{rev}:modx/eval/retrieval.py"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(), "retrieval_before.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("retrieval_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(backend: str, n_texts: int, per_image: int, dim: int, approximate: bool,
          before_rev: str | None = None) -> list[dict]:  # fmt: skip
    from modx.eval import retrieval

    img, txt, ids = synthetic(n_texts, per_image, dim)
    runs = [("", retrieval)] + ([(f"@{before_rev}", _module_at(before_rev))] if before_rev else [])
    rows = []
    for tag, module in reversed(runs):  # the code before first, the current code last
        rows.append(_timed(module.retrieval_metrics, img, txt, ids, backend, approximate, tag))
    return rows


def _timed(retrieval_metrics, img, txt, ids, backend: str, approximate: bool, tag: str) -> dict:
    n_texts, dim = txt.shape
    per = int(np.bincount(ids).max())
    retrieval_metrics(img[:64], txt[: 64 * per], ids[: 64 * per], backend=backend)
    before = _rss_mib()
    cpu, start = time.process_time(), time.perf_counter()
    metrics = retrieval_metrics(img, txt, ids, backend=backend, approximate=approximate)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "backend": backend + ("-hnsw" if approximate else "") + tag,
        "cpu_seconds": round(cpu, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "n_images": len(img),
        "n_texts": n_texts,
        "dim": dim,
        "seconds": round(seconds, 2),
        "extra_peak_mib": round(max(0.0, peak - before), 1),
        "full_matrix_mib": round(len(img) * n_texts * 4 / 2**20, 1),
        "metrics": metrics,
    }


def band_report(n_texts: int, per_image: int, dim: int) -> dict:
    """Fraction of (image, text) pairs whose score lies within a first pass's rigorous
    error bound of the query's best match score (the pairs the exact count must rescore
    in float64), for the float32 pass the module uses and for a bfloat16 one, on the
    benchmark's data (several N x M float64 matrices: 10k captions take ~1 GB, 50k ~20 GB)."""
    import torch

    img, txt, ids = synthetic(n_texts, per_image, dim)
    a64, t64 = img.astype(np.float64), txt.astype(np.float64)
    s = a64 @ t64.T  # (N, M)
    pos_t = (a64[ids] * t64).sum(1)
    pos_i = np.full(len(img), -np.inf)
    np.maximum.at(pos_i, ids, pos_t)
    out = {"n_images": len(img), "n_texts": n_texts, "dim": dim}
    # float32: |fl(a.b) - a.b| <= d u |a||b| / (1 - d u), u = 2^-24 (what the module uses)
    u = dim * 2.0**-24 / (1 - dim * 2.0**-24)
    na, nt = np.linalg.norm(a64, axis=1), np.linalg.norm(t64, axis=1)
    bounds = {"float32": u * na[:, None] * nt[None, :]}
    # bfloat16 inputs, exact products, float32 accumulation: with r = a - bf16(a),
    # |a.b - bf16(a).bf16(b)| <= |r_a||bf16(b)| + |bf16(a)||r_b| + |r_a||r_b| (Cauchy-Schwarz
    # on the residuals actually left, tighter than (2u + u^2)|a||b| with u = 2^-8), plus
    # the accumulation term (and a bfloat16 output rounding, u |s|, which torch's CPU
    # matmul adds and this leaves out: the fraction is a lower bound)
    def split(x):
        xb = torch.from_numpy(x).bfloat16().double().numpy()
        return np.linalg.norm(xb, axis=1), np.linalg.norm(x.astype(np.float64) - xb, axis=1)
    (ba, ra), (bt, rt) = split(img), split(txt)
    bounds["bfloat16"] = (ra[:, None] * bt[None, :] + ba[:, None] * rt[None, :] + ra[:, None] * rt[None, :]
                          + u * ba[:, None] * bt[None, :])  # fmt: skip
    for name, b in bounds.items():
        not_match = ids[None, :] != np.arange(len(img))[:, None]
        out[f"{name}_i2t_band"] = float(((np.abs(s - pos_i[:, None]) <= b) & not_match).mean())
        out[f"{name}_t2i_band"] = float(((np.abs(s - pos_t[None, :]) <= b) & not_match).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="captions")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--backends", nargs="+", default=["faiss", "torch"])
    p.add_argument("--approximate", action="store_true", help="also faiss with an HNSW index")
    p.add_argument("--large", action="store_true",
                   help="the issue-11 size: 100k images x 500k captions, d=256, faiss backend only")
    p.add_argument("--before", metavar="REV",
                   help="also time modx/eval/retrieval.py at this git revision, same process and data")
    p.add_argument("--bands", action="store_true",
                   help="report the share of pairs a float32 / bfloat16 first pass must rescore")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--child-approximate", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        rows = child(args.child[0], int(args.child[1]), args.captions_per_image, args.dim,
                     args.child_approximate, args.before)  # fmt: skip
        print(json.dumps(rows))
        return 0
    if args.bands:
        for n in args.sizes if args.sizes != [10_000, 100_000] else [10_000]:
            print(json.dumps(band_report(n, args.captions_per_image, args.dim)))
        return 0
    if args.large:
        args.sizes, args.dim, args.captions_per_image, args.backends = [500_000], 256, 5, ["faiss"]
    runs = [(b, False) for b in args.backends] + ([("faiss", True)] if args.approximate else [])
    rows = []
    for n in args.sizes:
        for backend, approx in runs:
            cmd = [sys.executable, __file__, "--child", backend, str(n), "--dim", str(args.dim),
                   "--captions-per-image", str(args.captions_per_image)]  # fmt: skip
            cmd += ["--child-approximate"] if approx else []
            cmd += ["--before", args.before] if args.before and not approx else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows += json.loads(out.strip().splitlines()[-1])
            print(
                f"done: {rows[-1]['backend']} {n} captions in {rows[-1]['seconds']} s",
                file=sys.stderr,
            )
    print(table(rows))
    exact = {}
    for r in rows:
        if not r["backend"].endswith("hnsw") and "@" not in r["backend"]:
            exact.setdefault(r["n_texts"], []).append(r["metrics"])
    same = all(all(m == ms[0] for m in ms) for ms in exact.values())
    print(f"\nexact backends give identical metrics: {'yes' if same else 'NO'}")
    now = {(r["backend"], r["n_texts"]): r["metrics"] for r in rows}
    for r in rows:
        if "@" in r["backend"]:
            equal = r["metrics"] == now.get((r["backend"].split("@")[0], r["n_texts"]))
            print(f"{r['backend']} vs now at {r['n_texts']:,} captions: identical metrics: "
                  f"{'yes' if equal else 'NO'}")  # fmt: skip
    if args.json:
        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "torch_threads": _torch_threads(), "identical": same, "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def table(rows: list[dict]) -> str:
    head = ("| backend | images | captions | dim | time (s) | CPU time (s) | load | extra peak (MiB) "
            "| full matrix (MiB) | mean recall |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['n_images']:,} | {r['n_texts']:,} | {r['dim']} | {r['seconds']:.2f} "
            f"| {r['cpu_seconds']:.1f} | {r['load_avg_1m']:.1f} | {r['extra_peak_mib']:.0f} "
            f"| {r['full_matrix_mib']:,.0f} | {r['metrics']['mean_recall']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

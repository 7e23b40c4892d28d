"""Benchmark modx.eval.retrieval_metrics: time and peak memory of the faiss and torch
backends at a few gallery sizes (synthetic unit vectors, several captions per image).

    python scripts/bench_retrieval.py                       # 10k and 100k captions, d=512
    python scripts/bench_retrieval.py --sizes 10000 --json bench.json
    python scripts/bench_retrieval.py --large --json big.json   # 100k images x 500k captions, d=256

Each (backend, size) runs in a fresh process so that its peak resident memory can be
measured; "extra peak" is the peak RSS during the call minus the RSS before it (the
embeddings themselves excluded). "full matrix" is what an N x M float32 similarity
matrix would take. Prints a table; --json writes the rows as JSON.
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
    n_images = n_texts // per_image
    img = rng.standard_normal((n_images, dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    ids = np.repeat(np.arange(n_images), per_image)
    txt = rng.standard_normal((n_texts, dim), dtype=np.float32)
    txt *= 8.0 / np.sqrt(dim)  # noise norm 8: caption-image cosine about 0.12
    txt += img[ids]
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, ids


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(backend: str, n_texts: int, per_image: int, dim: int, approximate: bool) -> dict:
    from modx.eval.retrieval import retrieval_metrics

    img, txt, ids = synthetic(n_texts, per_image, dim)
    retrieval_metrics(img[:64], txt[: 64 * per_image], ids[: 64 * per_image], backend=backend)
    before = _rss_mib()
    start = time.perf_counter()
    metrics = retrieval_metrics(img, txt, ids, backend=backend, approximate=approximate)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "backend": backend + ("-hnsw" if approximate else ""),
        "n_images": len(img),
        "n_texts": n_texts,
        "dim": dim,
        "seconds": round(seconds, 2),
        "extra_peak_mib": round(max(0.0, peak - before), 1),
        "full_matrix_mib": round(len(img) * n_texts * 4 / 2**20, 1),
        "metrics": metrics,
    }


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
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--child-approximate", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        row = child(args.child[0], int(args.child[1]), args.captions_per_image, args.dim,
                    args.child_approximate)  # fmt: skip
        print(json.dumps(row))
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
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(
                f"done: {rows[-1]['backend']} {n} captions in {rows[-1]['seconds']} s",
                file=sys.stderr,
            )
    print(table(rows))
    exact = {}
    for r in rows:
        if not r["backend"].endswith("hnsw"):
            exact.setdefault(r["n_texts"], []).append(r["metrics"])
    same = all(all(m == ms[0] for m in ms) for ms in exact.values())
    print(f"\nexact backends give identical metrics: {'yes' if same else 'NO'}")
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
    head = "| backend | images | captions | dim | time (s) | extra peak (MiB) | full matrix (MiB) | mean recall |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['n_images']:,} | {r['n_texts']:,} | {r['dim']} | {r['seconds']:.2f} "
            f"| {r['extra_peak_mib']:.0f} | {r['full_matrix_mib']:,.0f} | {r['metrics']['mean_recall']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

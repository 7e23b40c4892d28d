"""Benchmark the bundled model configs: parameters and CPU time of forward / forward+backward.

    python scripts/bench_models.py [--models modx-tiny-s4d ...] [--batch 64] [--threads 2]
                                   [--json docs/bench_models.json]

Prints a Markdown table and writes JSON. Times are medians over --repeats steps after one
warm-up step, wall clock, with torch.set_num_threads(--threads); images at the config's
size, captions at its context length. The load average is recorded, since a busy machine
slows every number: the table also gives the process CPU seconds of a step (all threads)
and the 1-minute load average after each model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss

from modx.models import create_model, list_models


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds (all threads) of `fn` after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench(name: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _, _, tokenizer = create_model(name)
    build_s = time.perf_counter() - t0
    size = model.visual.preprocess_cfg["size"]
    images = torch.randn(batch, 3, *size)
    text = tokenizer([f"a photo of a small red shape number {i}" for i in range(batch)])
    loss_fn = ClipLoss()

    def forward():
        with torch.no_grad():
            model(images, text)

    def train_step():
        model.zero_grad(set_to_none=True)
        out = model(images, text)
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()

    model.train()
    fwd_wall, fwd_cpu = _median_time(forward, repeats)
    step_wall, step_cpu = _median_time(train_step, repeats)
    return {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "image_size": size[0],
        "context_length": int(text.shape[1]),
        "batch": batch,
        "build_s": round(build_s, 2),
        "forward_s": round(fwd_wall, 3),
        "fwd_bwd_s": round(step_wall, 3),
        "fwd_bwd_cpu_s": round(step_cpu, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[n for n in list_models() if "tiny" in n])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench_models.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        rows.append(bench(name, args.batch, args.repeats))
        print(f"  measured {name}", flush=True)
    header = ["model", "params (M)", "image", "ctx", "batch", "forward (s)", "fwd+bwd (s)",
              "fwd+bwd CPU (s)", "load"]
    keys = ["model", "params_M", "image_size", "context_length", "batch", "forward_s", "fwd_bwd_s",
            "fwd_bwd_cpu_s", "load_avg_1m"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    meta = {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__}
    print(f"threads={meta['threads']} load_avg_1m={meta['load_avg_1m']} torch={meta['torch']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

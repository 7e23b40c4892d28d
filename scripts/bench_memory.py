"""Per-process memory of the model state, DDP vs FSDP (issue 19, item 3).

    python scripts/bench_memory.py --json runs/bench_memory.json
    python scripts/bench_memory.py --models ViT-B-16 --processes 2 --modes fsdp

For each model, mode (ddp, fsdp) and process count (1, 2) this starts the processes
(torch.distributed.run, gloo on the CPU), builds the model with the same seed (no
pretrained weights), makes the Mod-X setting (the student, AdamW, and a frozen old model:
a copy, or under FSDP sharded like the student with modx.train.fsdp), and takes one
optimiser step of the CLIP loss plus Mod-X's KL on a global batch of 2 images at the
model's size. Then every process counts the storage its tensors hold, by kind:

    params     the student's parameters and buffers (its shards under FSDP)
    grads      their gradients (after the step, before they are cleared)
    optimizer  AdamW's moments and step counts
    old        the old model's parameters and buffers

`model state` is their sum, the per-process memory the issue's goal is about; `peak RSS`
is the process's maximum resident memory (ru_maxrss: the model state plus activations,
the gathered units FSDP holds during forward/backward, the Python/torch runtime; for DDP
with 2 processes also its gradient buckets, a grads-sized copy not counted above). Figures
are the max over processes. Prints a table; --json writes the rows.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("modx-base-s4d", "ViT-B-16")
MARK = "BENCH_MEMORY "


def storage_bytes(tensors: list, seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not counted yet (`seen`: data pointers)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def worker(model_name: str, mode: str, batch: int) -> None:
    """One process of a measurement (started by torch.distributed.run)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(ROOT))
    from modx.losses import clip_loss, gather_features, modx_kl
    from modx.models import create_model
    from modx.train import fsdp
    from modx.train.loop import frozen_copy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model(model_name)[0]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    context = getattr(model, "context_length", None) or model.text.context_length
    if mode == "fsdp":
        sharding = fsdp.Sharding.create("FULL_SHARD", torch.device("cpu"))
        model = sharding.shard(model)
        old = sharding.frozen_copy(model)
        sharding.template = None  # a meta-device template: no storage
        net = model
    else:
        old = frozen_copy(model)
        net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    b = batch // world
    g = torch.Generator().manual_seed(rank)
    image, text = torch.randn(b, 3, size, size, generator=g), torch.randint(1, 1000, (b, context), generator=g)
    start = time.perf_counter()
    out = net(image, text)
    with torch.no_grad():
        old_out = old(image, text)
    img, txt = gather_features(out["image_features"], out["text_features"])
    img_old, txt_old = gather_features(old_out["image_features"], old_out["text_features"], gather_with_grad=False)
    loss = clip_loss(img, txt, out["logit_scale"]) + modx_kl(img, txt, img_old, txt_old)
    loss.backward()
    if mode == "fsdp":
        fsdp.sync_replicated_grads(model)
    optimizer.step()
    step_s = time.perf_counter() - start

    seen: set[int] = set()
    row = {
        "params": storage_bytes([*model.parameters(), *model.buffers()], seen),
        "grads": storage_bytes([p.grad for p in model.parameters()], seen),
        "optimizer": storage_bytes([v for s in optimizer.state.values() for v in s.values()], seen),
        "old": storage_bytes([*old.parameters(), *old.buffers()], seen),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": step_s,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    row["model_state"] = row["params"] + row["grads"] + row["optimizer"] + row["old"]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        worst = {k: max(r[k] for r in rows) for k in row}
        print(MARK + json.dumps({"model": model_name, "mode": mode, "processes": world, **worst}), flush=True)
    dist.destroy_process_group()


def measure(model: str, mode: str, processes: int, batch: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           __file__, "--worker", model, mode, str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{model} {mode} x{processes} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[0][len(MARK):])


def table(rows: list[dict]) -> str:
    mib = 2**20
    head = f"{'model':<14} {'mode':<5} {'procs':>5} {'params':>8} {'grads':>8} {'optim':>8} {'old':>8} " \
           f"{'model state':>11} {'vs DDP':>6} {'peak RSS':>9} {'step s':>7}"
    lines = [head, "-" * len(head)]
    ddp = {(r["model"], r["processes"]): r["model_state"] for r in rows if r["mode"] == "ddp"}
    for r in rows:
        ratio = r["model_state"] / ddp[(r["model"], r["processes"])] if (r["model"], r["processes"]) in ddp else None
        lines.append(
            f"{r['model']:<14} {r['mode']:<5} {r['processes']:>5} {r['params'] / mib:>8.0f} {r['grads'] / mib:>8.0f} "
            f"{r['optimizer'] / mib:>8.0f} {r['old'] / mib:>8.0f} {r['model_state'] / mib:>11.0f} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>6} {r['peak_rss'] / mib:>9.0f} {r['step_s']:>7.1f}"
        )
    return "\n".join(lines) + "\n(MiB per process, the max over processes)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=2, help="global batch of the step")
    parser.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        for n in args.processes:
            for mode in args.modes:
                threads = max(1, (os.cpu_count() or 1) // n)
                rows.append(measure(model, mode, n, args.batch, threads))
                print(f"measured {model} {mode} x{n}", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}
        args.json.write_text(json.dumps({"rows": rows, "machine": machine, "command": " ".join(sys.argv)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark training throughput: modx fine-tuning against open_clip's own trainer.

    python scripts/bench_train.py --json runs/bench_train.json
    python scripts/bench_train.py --steps 100 --open-clip-path /work/sidepkgs/openclip_train

Both trainers get the same model (a `local-dir:` directory holding open_clip_config.json
and open_clip_model.safetensors, written here from a fixed seed), the same shards (the
built-in `digits` set), the same global batch, data workers, precision, AdamW settings,
warm-up + cosine schedule and gradient clipping, one after the other in this process's
children. Throughput is taken from the trainers' own progress lines, time-stamped here
as they arrive: samples between the first log line after warm-up and the last one of
the phase, over the wall time between them (start-up and evaluation excluded).

Rows:
- `modx finetune` and `open_clip_train`: the headline ratio.
- `modx modx (phase 2)`: a Mod-X step with its old model, against `modx modx (phase 1)`,
  the same run's first phase (no old model yet): the Mod-X overhead.
- `loader modx` / `loader open_clip`: samples/s of one data worker alone (decode +
  augment + tokenise + collate), no model.

open_clip_train is not a modx dependency: install it (and the webdataset it needs) in a
side directory and pass it with --open-clip-path, e.g.

    pip install --target /work/sidepkgs/openclip_train --no-deps \\
        "open_clip_torch[training]==3.3.0" "webdataset<0.2.90" && \\
    pip install --target /work/sidepkgs/openclip_train pandas

Without it the open_clip rows are skipped. Prints a table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_VIT = {  # a small ViT CLIP that open_clip and modx both build from this config
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def write_model_dir(directory: Path, seed: int = 0, name: str | None = None) -> str:
    """open_clip_config.json + open_clip_model.safetensors of TINY_VIT, or of open_clip's
    built-in config `name` (e.g. ViT-B-16; random weights, seeded)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = TINY_VIT if name is None else open_clip.get_model_config(name)
    if cfg is None:
        raise SystemExit(f"bench_train.py: open_clip has no model config {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    return f"local-dir:{directory}"


def timed_lines(cmd: list[str], env: dict[str, str], log: Path) -> list[tuple[float, str]]:
    """Run `cmd`, return its output lines (stdout + stderr) with their arrival times."""
    lines = []
    with open(log, "w") as f, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    ) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter(), line))
            f.write(line)
    if proc.returncode:
        tail = "".join(line for _, line in lines[-30:])
        raise RuntimeError(f"{cmd[:3]} failed with status {proc.returncode}; see {log}:\n{tail}")
    return lines


def rate(points: list[tuple[float, int]], skip: int = 1) -> dict:
    """samples/s between the (skip+1)-th progress point and the last one."""
    if len(points) < skip + 2:
        raise RuntimeError(f"too few progress lines ({len(points)}) to measure a rate")
    (t0, n0), (t1, n1) = points[skip], points[-1]
    return {"samples_per_s": round((n1 - n0) / (t1 - t0), 1), "samples": n1 - n0, "seconds": round(t1 - t0, 2)}


_MODX_STEP = re.compile(r"^step (\d+)/\d+ .*\bphase (\d+)")
_OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")


def run_modx(args, arch: str, train: str, evals: str, strategy: str, phases: int, out: Path, env) -> list[dict]:
    phase_list = ", ".join(
        f"{{name: p{i}, train: '{train}', eval: '{evals}', steps: {args.steps}}}" for i in range(phases)
    )
    cmd = [
        sys.executable, str(ROOT / "train_modx.py"),
        f"model.arch={arch}", f"strategy.name={strategy}", f"stream.phases=[{phase_list}]",
        f"train.batch_size={args.batch}", f"train.workers={args.workers}", f"train.precision={args.precision}",
        f"train.lr={args.lr}", "train.weight_decay=0.1", f"train.warmup={args.warmup / args.steps}",
        "train.grad_clip=1.0", f"train.output_dir={out}", "train.tracker=none", "train.progress=false",
        f"train.log_every={args.log_every}", "train.ckpt_every=100000", "eval.initial=false",
        "eval.report=false", "eval.probe=64", "eval.backend=torch",
        # phase 1 without an old model (the weights are loaded, so `auto` would align it
        # with the initial model): plain CLIP, against which phase 2's Mod-X step compares
        "strategy.align_initial=false",
    ]  # fmt: skip
    lines = timed_lines(cmd, env, out.with_suffix(".log"))
    per_phase: dict[int, list[tuple[float, int]]] = {}
    for t, line in lines:
        m = _MODX_STEP.search(line)
        if m:
            per_phase.setdefault(int(m.group(2)), []).append((t, int(m.group(1)) * args.batch))
    return [{"phase": p, **rate(points)} for p, points in sorted(per_phase.items())]


def run_open_clip(args, arch: str, train: str, out: Path, env) -> dict:
    shutil.rmtree(out / "run", ignore_errors=True)  # open_clip_train refuses an existing experiment
    n = args.steps * args.batch
    cmd = [
        sys.executable, "-m", "open_clip_train.main", "--model", arch, "--train-data", train,
        "--dataset-type", "webdataset", "--dataset-resampled", "--train-num-samples", str(n),
        "--batch-size", str(args.batch), "--workers", str(args.workers), "--precision", args.precision,
        "--lr", str(args.lr), "--wd", "0.1", "--warmup", str(args.warmup), "--epochs", "1",
        "--grad-clip-norm", "1.0", "--log-every-n-steps", str(args.log_every), "--logs", str(out),
        "--name", "run", "--report-to", "", "--save-frequency", "0", "--seed", "0",
    ]  # fmt: skip
    side_env = {**env, "PYTHONPATH": os.pathsep.join([args.open_clip_path, env.get("PYTHONPATH", "")])}
    lines = timed_lines(cmd, side_env, out.with_suffix(".log"))
    points = [(t, int(m.group(1))) for t, line in lines if (m := _OPEN_CLIP_STEP.search(line))]
    return rate(points)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per phase")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/bench_train")
    p.add_argument("--open-clip-path", default="/work/sidepkgs/openclip_train",
                   help="side directory where open_clip_train is installed")  # fmt: skip
    p.add_argument("--only", nargs="+", choices=["finetune", "open_clip", "modx", "loader", "step"],
                   default=["finetune", "open_clip", "modx", "loader", "step"])  # fmt: skip
    p.add_argument("--step-repeats", type=int, default=10, help="model-only steps per strategy")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of both trainers")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--model", help="an open_clip model config (e.g. ViT-B-16, at its own image size) "
                   "instead of the small ViT")  # fmt: skip
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)  # before torch starts its threads

    from modx.data.builtin import ensure_builtin

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = ensure_builtin("digits", args.data_root)
    arch = write_model_dir(out / "model", name=args.model)
    # passive OpenMP waits: on a shared machine spinning threads cost 2-3x (BENCHMARKS.md)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": args.omp_wait_policy}
    have_open_clip = (Path(args.open_clip_path) / "open_clip_train").is_dir()
    rows: list[dict] = []
    load = [os.getloadavg()[0]]
    if "finetune" in args.only:
        r = run_modx(args, arch, train, evals, "finetune", 1, out / "modx_finetune", env)[0]
        rows.append({"run": "modx finetune", **r})
    if "open_clip" in args.only and have_open_clip:
        rows.append({"run": "open_clip_train", **run_open_clip(args, arch, train, out / "open_clip", env)})
    if "modx" in args.only:
        for r in run_modx(args, arch, train, evals, "modx", 2, out / "modx_modx", env):
            rows.append({"run": f"modx modx (phase {r['phase'] + 1})", **r})
    if "loader" in args.only:
        rows += loader_rows(args, arch, train, have_open_clip, env)
    if "step" in args.only:
        rows += step_rows(args, arch, train)
    load.append(os.getloadavg()[0])
    ratios = ratios_of(rows)
    print(table(rows))
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}")
    if args.json:
        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "args": vars(args), "load_average": load, "rows": rows, "ratios": ratios}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


def ratios_of(rows: list[dict]) -> dict[str, float]:
    sps = {r["run"]: r["samples_per_s"] for r in rows}
    pairs = {
        "modx / open_clip_train (fine-tuning samples/s)": ("modx finetune", "open_clip_train"),
        "Mod-X step time / plain CLIP step time (same run)": ("modx modx (phase 1)", "modx modx (phase 2)"),
        "Mod-X step time / fine-tuning step time (model only, interleaved)": ("step finetune", "step modx"),
        "paper Mod-X step time / fine-tuning step time (model only, interleaved)": ("step finetune", "step modx-paper"),
        "modx model step speed-up over open_clip's forward (samples/s, interleaved)": (
            "step finetune", "step finetune, open_clip forward"),
        "loader modx / open_clip (samples/s, one worker)": ("loader modx", "loader open_clip"),
    }
    return {name: sps[a] / sps[b] for name, (a, b) in pairs.items() if a in sps and b in sps}


def loader_rows(args, arch: str, train: str, have_open_clip: bool, env) -> list[dict]:
    rows = []
    n = max(20, args.steps // 2)
    code = _LOADER_CODE.format(root=str(ROOT), arch=arch, train=train, batch=args.batch, n=n)
    for name, extra in (("modx", "modx"), ("open_clip", "open_clip")):
        if name == "open_clip" and not have_open_clip:
            continue
        run_env = dict(env)
        if name == "open_clip":
            run_env["PYTHONPATH"] = os.pathsep.join([args.open_clip_path, env.get("PYTHONPATH", "")])
        res = subprocess.run([sys.executable, "-c", code, extra], capture_output=True, text=True, env=run_env)
        if res.returncode:
            raise RuntimeError(f"loader benchmark ({name}) failed:\n{res.stderr[-3000:]}")
        rows.append({"run": f"loader {name}", **json.loads(res.stdout.strip().splitlines()[-1])})
    return rows


def step_rows(args, arch: str, train: str) -> list[dict]:
    """Model-only steps (strategy loss + backward + AdamW) on one fixed batch of the
    digits shards, interleaved so that every row sees the same load. The batch is what the
    loop feeds: its last quarter replayed (modx's default buffer; fine-tuning ignores it),
    captions cut to the longest (train.trim_padding). `modx` is the default Mod-X (KL over
    the replayed samples), `modx-paper` the KL over the whole batch; `open_clip forward`
    is fine-tuning with open_clip's own forward of the same weights (full-length captions,
    every row of every block): what modx's exact shortcuts save."""
    import open_clip
    import torch
    from accelerate import Accelerator

    from modx.config import ReplayConfig, StrategyConfig, load_config
    from modx.models import create_model, trim_padding, trims_padding
    from modx.strategies import build_strategy
    from modx.train.data import resolve_phases, train_loader
    from modx.train.loop import adamw, frozen_copy

    model, pre_train, _, tok = create_model(arch)
    cfg = load_config(None, [f"model.arch={arch}", f"stream.phases=[{{name: a, train: '{train}', eval: '{train}', "
                             "steps: 1}]", f"train.batch_size={args.batch}", "train.workers=0"])  # fmt: skip
    data = next(iter(train_loader(cfg, resolve_phases(cfg)[0], pre_train, tok, phase_step=0, global_step=0,
                                  rank=0, world_size=1)))  # fmt: skip
    plain = open_clip.model.CLIP(**TINY_VIT, output_dict=True)
    plain.load_state_dict(model.state_dict())
    old = frozen_copy(model)
    models = {"modx": model, "open_clip": plain}
    opts = {k: adamw([{"params": [p for p in m.parameters() if p.requires_grad]}], torch.device("cpu"))
            for k, m in models.items()}  # fmt: skip
    acc = Accelerator(cpu=True)
    fresh = args.batch - round(0.25 * args.batch)
    batch = {"image": data["image"], "text": trim_padding(data["text"]) if trims_padding(model) else data["text"],
             "key": [str(i) for i in range(args.batch)],
             "replayed": [False] * fresh + [True] * (args.batch - fresh)}  # fmt: skip
    configs = {"finetune": StrategyConfig(name="finetune"), "modx": StrategyConfig(name="modx"),
               "modx-paper": StrategyConfig(name="modx", replay=ReplayConfig(ratio=0.0)),
               "finetune, open_clip forward": StrategyConfig(name="finetune")}  # fmt: skip
    runs = {name: (build_strategy(c, acc), None if "finetune" in name else old) for name, c in configs.items()}
    seconds = {name: [] for name in runs}
    for i in range(2 * args.step_repeats + 2):
        for name, (strategy, old_model) in runs.items():
            which = "open_clip" if "open_clip" in name else "modx"
            feed = {**batch, "text": data["text"]} if which == "open_clip" else batch
            start = time.perf_counter()
            loss, _ = strategy.loss(models[which], feed, old_model)
            loss.backward()
            opts[which].step()
            opts[which].zero_grad(set_to_none=True)
            if i >= 2:  # warm-up
                seconds[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in seconds.items():
        ts = sorted(ts)[: len(ts) // 2 + 1]  # the faster half: robust to load spikes
        sec = sum(ts) / len(ts)
        rows.append({"run": f"step {name}", "samples_per_s": round(args.batch / sec, 1),
                     "samples": args.batch * len(ts), "seconds": round(sum(ts), 2)})  # fmt: skip
    return rows


# One data worker alone: batches of decoded, augmented images and tokenised captions.
_LOADER_CODE = """
import json, sys, time
sys.path.insert(0, {root!r})
import open_clip  # noqa: F401
which, batch, n = sys.argv[1], {batch}, {n}
if which == "modx":
    from modx.config import load_config
    from modx.models import create_model
    _, pre_train, _, tok = create_model({arch!r})
    from modx.train.data import resolve_phases, train_loader
    cfg = load_config(None, ["model.arch={arch}", "stream.phases=[{{name: a, train: '{train}', eval: '{train}', "
                             "steps: 100000}}]", "train.batch_size={batch}", "train.workers=1"])
    phase = resolve_phases(cfg)[0]
    batches = iter(train_loader(cfg, phase, pre_train, tok, phase_step=0, global_step=0, rank=0, world_size=1))
else:
    import argparse
    from open_clip_train.data import get_wds_dataset
    _, pre_train, _ = open_clip.create_model_and_transforms({arch!r})
    tok = open_clip.get_tokenizer({arch!r})
    a = argparse.Namespace(train_data={train!r}, train_data_upsampling_factors=None, dataset_resampled=True,
                           train_num_samples=batch * n * 4, batch_size=batch, workers=1, world_size=1,
                           seed=0, val_data=None, distributed=False)
    batches = iter(get_wds_dataset(a, pre_train, is_train=True, epoch=0, tokenizer=tok).dataloader)
next(batches)
start = time.perf_counter()
for _ in range(n):
    next(batches)
sec = time.perf_counter() - start
print(json.dumps({{"samples_per_s": round(batch * n / sec, 1), "samples": batch * n, "seconds": round(sec, 2)}}))
"""


def table(rows: list[dict]) -> str:
    lines = ["| run | samples/s | samples timed | seconds |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['samples_per_s']:.1f} | {r['samples']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

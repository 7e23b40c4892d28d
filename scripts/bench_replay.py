"""What replay costs at 224 px: memory, checkpoint size and training speed of each source.

    python scripts/bench_replay.py [--steps 30] [--buffer 10000] [--json runs/bench_replay.json]

A two-phase stream of real photographs at 224 px (the textile images of conformal-clip-data,
250 px JPEGs, each in five orientations: 10,000 distinct samples for the first phase, 500
for the second), the `modx-small-s4d` CLIP (ViT-S-16 size), batch 8, 2 loader workers.
The first phase is trained once for a few steps; every row continues from it through the
second phase in a process of its own:

- `finetune`: no replay;
- `replay (stream)` / `modx (stream)`: 25 % (modx) or 50 % (replay) of each batch streamed
  from the first phase's shards;
- `replay (buffer)` / `modx (buffer)`: the same from a buffer of `--buffer` encoded samples.
  Training 10,000 samples at this size takes hours here, so the buffer is filled from the
  first phase's shards directly (ReplayBuffer.add, exactly what training would have put
  there had it seen them) and written into the checkpoint the second phase resumes from;
- `modx (paper)`: Mod-X without replay (its old model, no replayed samples).

Per row: the peak resident memory of the training process (getrusage) and the peak
proportional set size of the process with its loader workers (PSS from
/proc/PID/smaps_rollup every 0.2 s: pages the workers share with it counted once), the
encoded bytes the buffer holds, the size of the last checkpoint, and the trainer's samples/s
in the second phase. Goals (issue 18): the stream adds <= 10 % memory over the same strategy
without replay; the buffer adds <= 10 % over the encoded bytes it holds; replay's samples/s
>= 0.9x fine-tuning's.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {  # name -> overrides of the second phase
    "finetune": ["strategy.name=finetune"],
    "replay (stream)": ["strategy.name=replay", "strategy.replay.source=stream"],
    "replay (buffer)": ["strategy.name=replay", "strategy.replay.source=buffer"],
    "modx (paper)": ["strategy.name=modx", "strategy.replay.ratio=0"],
    "modx (stream)": ["strategy.name=modx", "strategy.replay.source=stream"],
    "modx (buffer)": ["strategy.name=modx", "strategy.replay.source=buffer"],
}


def make_data(root: Path) -> tuple[str, str, str, str]:
    """Shards of 224+ px photographs: (old train, old eval, new train, new eval) URLs."""
    import conformal_clip_data as ccd
    from PIL import Image

    from modx.data.writer import write_shards

    if (root / "done").is_file():
        return json.loads((root / "done").read_text())
    turns = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
             Image.Transpose.ROTATE_270]
    files = [(cls, os.path.join(d, f)) for cls, d in (("plain", ccd.nominal_dir()), ("local", ccd.local_dir()),
                                                      ("global", ccd.global_dir()))
             for f in sorted(os.listdir(d)) if f.endswith(".jpg")]

    def samples(which: range, turn_ids: list[int]):
        for i in which:
            cls, path = files[i % len(files)]
            for t in turn_ids:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    img = img.transpose(turns[t]) if turns[t] is not None else img
                out = io.BytesIO()
                img.save(out, format="JPEG", quality=90)
                yield {"__key__": f"t{i:05d}x{t}", "jpg": out.getvalue(),
                       "txt": f"a photo of {cls} woven fabric, view {t}"}

    n = len(files)  # 2000
    urls = []
    for name, which, turn_ids, count in (("old", range(n), [0, 1, 2, 3, 4], 1000),
                                         ("new", range(100), [0, 1, 2, 3, 4], 100)):
        write_shards(samples(which, turn_ids), str(root / name), "train", maxcount=count)
        write_shards(samples(range(n - 16, n), [0]), str(root / name), "test", maxcount=100)
        train = sorted((root / name).glob("train-*.tar"))
        urls += [f"{root / name}/train-{{000000..{len(train) - 1:06d}}}.tar", str(root / name / "test-000000.tar")]
    (root / "done").write_text(json.dumps(urls))
    return tuple(urls)


def config(out: Path, urls: tuple[str, ...], steps: int, args) -> list[str]:
    old_train, old_eval, new_train, new_eval = urls
    return [
        f"model.arch={args.arch}",
        f"stream.phases=[{{name: old, train: '{old_train}', eval: '{old_eval}', steps: 2}}, "
        f"{{name: new, train: '{new_train}', eval: '{new_eval}', steps: {steps}}}]",
        f"train.batch_size={args.batch}", f"train.workers={args.workers}", f"train.output_dir={out}",
        "train.tracker=none", "train.progress=false", "train.log_every=10", "train.ckpt_every=100000",
        f"strategy.replay.size={args.buffer}", "eval.probe=16", "eval.batch_size=16", "eval.report=false",
        "eval.backend=torch",
    ]


def _child(overrides: list[str], until_phase: int | None, resume: bool, queue) -> None:
    from modx.config import load_config
    from modx.train import run

    run(load_config(None, overrides), resume="latest" if resume else None, until_phase=until_phase)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def tree_pss_mb(pid: int) -> float:
    """PSS of `pid` and its descendants (MB)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def train(overrides: list[str], until_phase: int | None, resume: bool) -> dict:
    """One training child; its wall time, peak RSS and the peak PSS of its process tree."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(overrides, until_phase, resume, queue))
    start = time.perf_counter()
    child.start()
    peak = [0.0]

    def watch() -> None:
        while child.is_alive():
            peak[0] = max(peak[0], tree_pss_mb(child.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    child.join()
    watcher.join()
    if child.exitcode != 0:
        raise SystemExit(f"bench_replay: a training run failed (exit status {child.exitcode})")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": queue.get(timeout=10), "peak_pss_mb": peak[0]}


def fill_buffer(state: Path, urls: str, size: int, seed: int) -> float:
    """Replace the state's replay buffer by one holding `size` samples of the first
    phase's shards (phase 0), as training would have kept them; returns its MB."""
    from modx.data.replay import ReplayBuffer
    from modx.data.samples import IMAGE_EXTS, read_captions, tar_samples
    from modx.data.seeds import stable_seed
    from modx.data.stats import SkipStats
    from modx.data.urls import parse_sources

    buffer = ReplayBuffer(size, 2**40, stable_seed(seed, "replay"))  # the seed ReplayFeed uses
    shards = ({"url": u} for source in parse_sources(urls) for u in source.urls)
    batch: list[tuple] = []
    for sample in tar_samples(shards, SkipStats()):
        ext = next(e for e in IMAGE_EXTS if e in sample)
        batch.append((sample["__key__"], ext, sample[ext], tuple(read_captions(sample))))
        if len(batch) == 50:
            buffer.add(batch, [50], 0, 0, buffer.seen // 50)
            batch = []
        if buffer.seen >= size:
            break
    buffer.save(state)
    return buffer.nbytes / 2**20


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_replay")
    parser.add_argument("--arch", default="modx-small-s4d")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps of the second phase")
    parser.add_argument("--buffer", type=int, default=10_000, help="samples in the replay buffer")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    out = Path(args.out)
    urls = make_data(out / "data")
    base = out / "phase0"
    if not (base / "checkpoints" / "latest").is_file():
        print("bench_replay: training the first phase once", flush=True)
        train(config(base, urls, args.steps, args) + ["strategy.name=finetune"], until_phase=0, resume=False)
    rows = []
    for name in args.rows:
        run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("logs", "report*"))
        overrides = config(run_dir, urls, args.steps, args) + ROWS[name]
        state = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        before = json.loads((state / "trainer_state.json").read_text())
        buffer_mb = 0.0
        if "buffer" in name:
            buffer_mb = fill_buffer(state, urls[0], args.buffer, seed=0)
        print(f"bench_replay: {name}", flush=True)
        measured = train(overrides, until_phase=None, resume=True)
        cost = json.loads((run_dir / "summary.json").read_text())["cost"]
        samples = cost["train_samples"] - before["global_step"] * args.batch
        seconds = cost["train_seconds"] - before["train_seconds"]
        latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        rows.append({"run": name, **{k: round(v, 1) for k, v in measured.items()},
                     "buffer_mb": round(buffer_mb, 1), "checkpoint_mb": round(dir_mb(latest), 1),
                     "samples_per_s": round(samples / seconds, 2)})
    report(rows, args)


def report(rows: list[dict], args) -> None:
    by = {r["run"]: r for r in rows}
    head = ["run", "peak RSS (MB)", "peak PSS with workers (MB)", "buffer (MB)", "checkpoint (MB)", "samples/s"]
    keys = ["run", "peak_rss_mb", "peak_pss_mb", "buffer_mb", "checkpoint_mb", "samples_per_s"]
    widths = [max(len(h), *(len(str(r[k])) for r in rows)) for h, k in zip(head, keys)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))
    goals = {}
    for base, replayed in (("finetune", "replay (stream)"), ("modx (paper)", "modx (stream)")):
        if base in by and replayed in by:
            goals[f"{replayed} memory / {base}"] = round(by[replayed]["peak_pss_mb"] / by[base]["peak_pss_mb"], 3)
    for stream, buffer in (("replay (stream)", "replay (buffer)"), ("modx (stream)", "modx (buffer)")):
        if stream in by and buffer in by and by[buffer]["buffer_mb"]:
            extra = by[buffer]["peak_pss_mb"] - by[stream]["peak_pss_mb"]
            goals[f"{buffer} extra memory / its encoded bytes"] = round(extra / by[buffer]["buffer_mb"], 3)
    for name in ("replay (stream)", "replay (buffer)"):
        if name in by and "finetune" in by:
            goals[f"{name} samples/s / finetune"] = round(by[name]["samples_per_s"] / by["finetune"]["samples_per_s"], 3)
    for k, v in goals.items():
        print(f"{k}: {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "goals": goals, "args": vars(args),
                                               "load_avg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

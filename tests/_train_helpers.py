"""Helpers for tests/test_train*.py: tiny configs, a deterministic fake data stream, and a
script entry point that `accelerate launch` runs with that stream.

    python tests/_train_helpers.py OUT_DIR [--resume] [KEY=VALUE ...]       # 1 process
    accelerate launch --multi_gpu --num_processes 2 tests/_train_helpers.py OUT_DIR ...

The fake stream draws the GLOBAL batch of every micro-step from a generator seeded by
(step, micro-step) and gives each process its slice, so any number of processes sees the
same global batches; evaluation is skipped. The script writes OUT_DIR/losses.json and
OUT_DIR/replayed_<rank>.json (per micro-step, the ids of the buffered samples that
process replayed); with --resume, losses-resumed.json and replayed-resumed_<rank>.json;
and OUT_DIR/digest_<rank>.txt, a hash of that process's final weights. A run stopped by a
preemption signal (modx.train.preempt) exits 0 and writes none of these.
MODX_TEST_NAN_STEPS=1,2 MODX_TEST_NAN_RANK=1 make those optimiser steps' loss NaN on that
process only (MODX_TEST_NAN_KIND=loss: a NaN added to the loss, finite gradients; grad:
NaN gradients too).
MODX_TEST_CPU_FP16=SCALE runs train.precision=fp16 on the CPU as Accelerate runs it on a
GPU (it gives a CPU run neither autocast nor a GradScaler): fp16 autocast and a GradScaler
with initial scale SCALE that grows after 2 good steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


MICRO_MODEL = {  # a smaller sibling of modx-tiny-transformer: tests stay fast
    "embed_dim": 32,
    "vision_cfg": {"backbone": "transformer", "image_size": 32, "patch_size": 8, "width": 32,
                   "layers": 1, "head_width": 16, "mlp_ratio": 2.0, "pool_type": "avg"},
    "text_cfg": {"backbone": "transformer", "context_length": 16, "vocab_size": 49408, "width": 32,
                 "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def micro_model(directory: Path) -> str:
    """Write the micro model config to `directory`; returns the path for model.arch."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "modx-micro.json"
    path.write_text(json.dumps(MICRO_MODEL))
    return str(path)


def digits_run_metrics(tmp_path: Path, name: str, how: list[str], port: int) -> dict[int, dict]:
    """`accelerate launch` (with the flags `how`) of train_modx.py on a 2-step digits phase in
    tmp_path/name (data built in tmp_path/data, eval probe 20): the metrics of results.jsonl
    by phase (-1: the initial model)."""
    extra = {"stream.phases": "[{name: a, builtin: digits, steps: 2}]", "eval.probe": 20}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(ROOT / "train_modx.py"),
           *tiny_overrides(tmp_path / name, tmp_path / "data", **extra)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
    return {r["phase"]: r["metrics"] for r in rows}


def tiny_overrides(run_dir: Path, data_root: Path, **extra: Any) -> list[str]:
    """A two-phase built-in stream (digits twice), small batches, no trackers, no bars."""
    base = {
        "model.arch": micro_model(data_root),
        "stream.data_root": str(data_root),
        "stream.phases": "[{name: a, builtin: digits, steps: 3}, {name: b, builtin: digits, steps: 3}]",
        "train.batch_size": 8,
        "train.workers": 0,
        "train.shuffle": 16,
        "train.output_dir": str(run_dir),
        "train.tracker": "none",
        "train.progress": False,
        "train.log_every": 1,
        "train.ckpt_every": 2,
        "eval.probe": 50,
        "eval.report": False,
        "eval.backend": "torch",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class FakeLoader:
    """The loader interface the loop uses (iter, stats, set_epoch, close) over fixed data.

    Global micro-batch i (of the stream segment seeded by `seed`) is drawn from a generator
    seeded by (seed, i): its fresh samples are PNG images with captions of three words,
    each decoded and augmented under a seed of its own, and each process takes its slice.
    With a replay plan (modx.data.replay, source buffer) the replayed samples are picked,
    decoded and augmented by modx's own functions. So any number of processes sees the
    same global batches."""

    def __init__(self, global_batch: int, rank: int, world: int, tokenizer: Any, seed: int,
                 preprocess: Any = None, replay: Any = None):
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.tokenizer, self.seed = tokenizer, seed
        self.preprocess, self.replay = preprocess, replay
        self.stats = SimpleNamespace(as_dict=lambda: {"samples": 0, "skipped": 0, "reasons": {}})

    def __iter__(self):
        from modx.data.loader import _collate_mixed
        from modx.data.replay import buffer_picks, decode_entry, rank_slice, seeded, view_seed
        from modx.data.stats import SkipStats

        counts = self.replay.counts if self.replay is not None else (0,) * self.world
        b = self.global_batch // self.world
        fresh = [b - c for c in counts]
        mine = slice(sum(fresh[: self.rank]), sum(fresh[: self.rank + 1]))
        for i in range(10**6):
            g = torch.Generator().manual_seed(self.seed * 100_003 + i)
            pixels = torch.randint(0, 256, (sum(fresh), 32, 32, 3), dtype=torch.uint8, generator=g)
            words = torch.randint(0, 10, (sum(fresh), 3), generator=g).tolist()
            samples = []
            for p in range(mine.start, mine.stop):
                key = f"s{self.seed}-{i}-{p}"
                image = Image.fromarray(pixels[p].numpy())
                caption = " ".join(f"w{w}" for w in words[p])
                view = seeded(self.preprocess, self.seed * 7919 + i * 131 + p, image) if self.preprocess else image
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                samples.append({"key": key, "image": view, "captions": [caption],
                                "raw": (key, "png", buffer.getvalue(), (caption,))})
            if counts[self.rank] and self.replay.entries:  # source buffer: modx's picks and views
                batch = self.replay.first_batch + i
                own = rank_slice(counts, self.rank)
                picks = buffer_picks(self.replay, batch)[own]
                samples += [decode_entry(self.replay.entries[j], self.preprocess, view_seed(self.replay, batch, own.start + k))
                            for k, j in enumerate(picks)]
            elif counts[self.rank]:  # source stream: "earlier" samples drawn like the fresh ones
                own = rank_slice(counts, self.rank)
                r = torch.Generator().manual_seed(self.seed * 100_003 + i + 10**9)
                pixels = torch.randint(0, 256, (sum(counts), 32, 32, 3), dtype=torch.uint8, generator=r)
                for p in range(own.start, own.stop):
                    image = Image.fromarray(pixels[p].numpy())
                    view = seeded(self.preprocess, self.seed * 7919 + i * 131 + p + 10**6, image)
                    samples.append({"key": f"r{self.seed}-{i}-{p}", "image": view, "captions": ["w1 w2 w3"],
                                    "replayed": True, "id": -1})
            keep_raw = self.replay is not None and self.replay.keep_raw
            out = _collate_mixed(samples, self.tokenizer, SkipStats(), keep_raw)
            if self.replay is None:
                out = {k: out[k] for k in ("image", "text", "key")}
            yield out

    def set_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class NullEvaluator:
    """No evaluation; `finish` writes summary.json with the loop's extra fields only
    (skipped steps, cost, how the run was distributed)."""

    def __init__(self, cfg: Any, eval_sets: Any, preprocess: Any, tokenizer: Any, run_dir: Path, *args: Any,
                 **kwargs: Any):
        self.run_dir = Path(run_dir)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict:
        return {}

    def due(self, *args: Any) -> bool:
        return False

    def headline(self, row: dict) -> str:
        return ""

    def forget_from(self, phase: int, global_step: int = 0) -> None:
        pass

    def reset(self) -> None:
        pass

    def finish(self, metric: str = "mean_recall", extra: dict | None = None) -> dict:
        (self.run_dir / "summary.json").write_text(json.dumps(extra or {}))
        return extra or {}


def install_fake_stream(losses: list[float], setattr: Any = setattr, replayed: list | None = None) -> None:
    """Patch modx.train.loop: fake data (reseeded by global step; zscl's reference pairs by
    the reference batches read), no evaluation, and
    record every micro-step's loss (`setattr`: pytest's monkeypatch.setattr in-process)
    and, into `replayed`, the ids of the buffered samples this process replayed in it."""
    import modx.strategies.zscl as zscl
    import modx.train.loop as loop

    def fake_loader(cfg, phase, preprocess, tokenizer, *, phase_step, global_step, rank, world_size, replay=None):
        return FakeLoader(cfg.train.batch_size, rank, world_size, tokenizer, global_step, preprocess, replay)

    def fake_reference(urls, batch_size, context, segment):  # zscl's reference pairs, same global batches
        world = context.world_size
        return FakeLoader(batch_size * world, context.rank, world, context.tokenizer, 10**6 + segment,
                          context.preprocess_eval)

    real_build = loop.build_strategy

    def recording_build(cfg, accelerator, **kwargs):
        strategy = real_build(cfg, accelerator, **kwargs)
        real_loss = strategy.loss

        def loss(*args, **kwargs):
            value, terms = real_loss(*args, **kwargs)
            value = _poisoned(value, args[0], accelerator, len(losses))
            # with train.local_loss each process holds its share: their mean is the loss
            losses.append(accelerator.reduce(value.detach().clone(), reduction="mean").item())
            if replayed is not None:
                batch = args[1]
                replayed.append([i for i, f in zip(batch.get("sample_id", []), batch.get("replayed", [])) if f])
            return value, terms

        strategy.loss = loss
        return strategy

    setattr(loop, "train_loader", fake_loader)
    setattr(zscl, "reference_loader", fake_reference)
    setattr(loop, "Evaluator", NullEvaluator)
    setattr(loop, "build_strategy", recording_build)


def _poisoned(value: torch.Tensor, model: Any, accelerator: Any, micro_step: int) -> torch.Tensor:
    """The loss, NaN at the micro-steps and process MODX_TEST_NAN_* name (see the module doc)."""
    steps = os.environ.get("MODX_TEST_NAN_STEPS")
    if not steps or accelerator.process_index != int(os.environ.get("MODX_TEST_NAN_RANK", "0")):
        return value
    if micro_step not in {int(s) for s in steps.split(",")}:
        return value
    if os.environ.get("MODX_TEST_NAN_KIND", "loss") == "loss":
        return value + float("nan")  # the loss only: its gradients stay finite
    return value + torch.sqrt(torch.zeros(()) * sum(p.sum() for p in model.parameters()))  # 0 * inf: NaN grads


def cpu_fp16(accelerator_class: type) -> type:
    """`accelerator_class` with fp16 autocast and a GradScaler on the CPU (MODX_TEST_CPU_FP16)."""

    class CpuFp16(accelerator_class):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if self.state.mixed_precision == "fp16":
                self.native_amp = True  # accelerator.autocast(): torch.autocast("cpu", torch.float16)
                self.scaler = torch.amp.GradScaler("cpu", init_scale=float(os.environ["MODX_TEST_CPU_FP16"]),
                                                   growth_interval=2)

    return CpuFp16


def weights_digest(model: Any) -> str:
    """A hash of a model's weights (equal on two processes iff their weights are)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fake_stream_overrides(out: Path, *extra: str) -> list[str]:
    """Two phases of 2 steps over the fake stream (the URLs only need to exist)."""
    out.mkdir(parents=True, exist_ok=True)
    shard = out / "fake.tar"
    shard.touch()
    return [
        f"model.arch={micro_model(out)}",
        f"stream.phases=[{{name: a, train: {shard}, eval: {shard}, steps: 2}}, "
        f"{{name: b, train: {shard}, eval: {shard}, steps: 2}}]",
        f"strategy.reference={shard}",  # read by zscl only
        f"train.output_dir={out}", "train.tracker=none", "train.progress=false", "train.batch_size=8",
        "train.log_every=1", "train.ckpt_every=100", *extra,
    ]


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    import modx.train.loop as loop
    from modx.config import load_config
    from modx.train import run
    from modx.train.preempt import Preempted

    out, resume = Path(argv[0]), "--resume" in argv
    losses: list[float] = []
    replayed: list[list[int]] = []
    install_fake_stream(losses, replayed=replayed)
    models: list[Any] = []
    real_frozen_copy = loop.frozen_copy

    def frozen_copy(model: Any) -> Any:  # called with the trained model at every phase end
        models[:] = [model]
        return real_frozen_copy(model)

    loop.frozen_copy = frozen_copy
    if os.environ.get("MODX_TEST_CPU_FP16"):
        loop.Accelerator = cpu_fp16(loop.Accelerator)
    try:
        run(load_config(None, fake_stream_overrides(out, *[a for a in argv[1:] if a != "--resume"])),
            resume="latest" if resume else None)
    except Preempted:
        return
    state, tag = PartialState(), "-resumed" if resume else ""
    (out / f"replayed{tag}_{state.process_index}.json").write_text(json.dumps(replayed))
    if models:  # (a sharded run snapshots its old model through modx.train.fsdp instead)
        (out / f"digest{tag}_{state.process_index}.txt").write_text(weights_digest(models[0]))
    if state.is_main_process:
        (out / f"losses{tag}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1:])

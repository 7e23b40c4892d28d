"""The continual training loop: phases -> steps -> strategy loss -> backward -> log ->
checkpoint -> evaluate, with Hugging Face Accelerate (one CPU, one GPU or many).

    accelerate launch train_modx.py --config configs/demo.yaml train.lr=1e-3

Only the model, the optimiser and the scheduler are prepared by Accelerate; every process
builds its own data loader (modx.train.data). `train.batch_size` is the GLOBAL batch of a
forward pass, so a config means the same optimisation on any number of processes.
"""

from __future__ import annotations

import copy
import math
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, is_wandb_available, set_seed
from torch import nn
from tqdm.auto import tqdm

from modx.config import Config, ConfigError, save_config, to_dict
from modx.models import ModelLoadError, create_model, model_param_groups, trims_padding
from modx.strategies import build_strategy, replay_ratio, validate_strategy
from modx.strategies.base import Context
from modx.train import fsdp
from modx.train.checkpoint import (
    export_phase,
    find_latest,
    forget_states,
    load_state,
    read_trainer_state,
    save_state,
)
from modx.train.data import (
    Phase,
    TimedBatches,
    joint_phase,
    resolve_eval_sets,
    resolve_phases,
    train_loader,
)
from modx.train.engines import (
    Zero3,
    accelerator_options,
    broadcast_scalars,
    deepspeed_problem,
    deepspeed_skipped,
    gathered,
    is_deepspeed,
    partition,
    refresh_master,
    zero_stage,
)
from modx.train.evaluate import Evaluator
from modx.train.faults import fault_point
from modx.train.launch import check_distributed
from modx.train.preempt import Preempted, Preemption
from modx.train.replay import ReplayFeed

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
MAX_LOGIT_SCALE = math.log(100)  # as open_clip: the learned temperature stays <= 100


class PhaseSchedule:
    """LR factor at a global optimiser step: per phase, linear warm-up over `warmup` of
    its steps, then cosine decay to 0; scaled by the phase's lr / train.lr."""

    def __init__(self, phases: list[Phase], base_lr: float, warmup: float):
        self.starts = [sum(p.steps for p in phases[:i]) for i in range(len(phases))]
        self.steps = [p.steps for p in phases]
        self.scales = [p.lr / base_lr for p in phases]
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        k = max(i for i, start in enumerate(self.starts) if start <= step or i == 0)
        s, n = step - self.starts[k], self.steps[k]
        warm = max(1, round(self.warmup * n))
        if s < warm:
            return self.scales[k] * (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, n - warm))
        return self.scales[k] * 0.5 * (1 + math.cos(math.pi * progress))


class Meter:
    """Loss terms, steps, samples and time since the last log line.

    Terms may be floats or tensors: tensors are summed where they live and read once per
    log line (no host sync per step), averaged over the processes (with train.local_loss
    each process holds its share of the loss; their mean is the global value) and over
    the optimiser steps that were taken (a skipped step's terms are left out)."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.steps, self.samples, self.start = 0, 0, time.perf_counter()
        self.pending: dict[str, float | torch.Tensor] = {}  # this optimiser step's terms
        self.taken: float | torch.Tensor = 0.0  # optimiser steps taken

    def add(self, terms: dict[str, float | torch.Tensor], weight: float) -> None:
        for k, v in terms.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else v
            self.pending[k] = self.pending.get(k, 0.0) + v * weight

    def step(self, samples: int, skipped: torch.Tensor) -> None:
        """End an optimiser step; `skipped` (0-d, 1.0 = skipped) drops its terms."""
        for k, v in self.pending.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(skipped > 0, 0.0, torch.as_tensor(v).to(skipped.device))
        self.taken = self.taken + (1 - skipped)
        self.pending = {}
        self.steps, self.samples = self.steps + 1, self.samples + samples

    def flush(self, batches: TimedBatches, accelerator: Accelerator) -> dict[str, float]:
        """Mean loss terms per step (mean over processes), global samples/s, the share of
        time spent waiting for data and the loader's skipped-sample count; then start a new
        interval."""
        elapsed = time.perf_counter() - self.start
        keys = sorted(self.sums)  # none when every step of the interval was skipped (on all processes)
        logs: dict[str, float] = {}
        if keys:
            sums = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32).to(accelerator.device) for k in keys])
            sums = accelerator.reduce(sums, reduction="mean") if accelerator.num_processes > 1 else sums
            taken = float(self.taken)
            logs = {k: v / taken for k, v in zip(keys, sums.tolist())} if taken else {}
        logs.update(
            samples_per_s=self.samples / elapsed,
            data_wait=batches.take_wait() / elapsed,
            skipped=batches.stats().get("skipped", 0),
        )
        self.__init__()
        return logs


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); a checkpoint was saved."""


class BadSteps:
    """Optimiser steps skipped for a non-finite loss or gradients: in total, in a row now,
    and the longest run since the last `read`. Counted on the device, read at log lines
    and checkpoints: no host sync per step."""

    def __init__(self, limit: int, device: torch.device, total: int = 0, in_row: int = 0, longest: int = 0):
        self.limit = limit
        longest = max(longest, in_row)  # (a state saved inside a log interval keeps its longest run)
        self.counts = torch.tensor([total, in_row, longest], dtype=torch.int64, device=device)
        self.total, self.in_row, self.longest = total, in_row, longest  # as of the last read

    def update(self, bad: torch.Tensor) -> None:
        """Count one optimiser step; `bad` is 1 (skipped) or 0, a 0-d tensor."""
        bad = bad.long()
        total, row, longest = self.counts.unbind()
        row = (row + 1) * bad
        self.counts = torch.stack([total + bad, row, torch.maximum(longest, row)])

    def read(self) -> int:
        """Read the counts (one host sync); returns the steps skipped since the last read.
        `longest >= limit` afterwards: stop the run."""
        before = self.total
        self.total, self.in_row, self.longest = self.counts.tolist()
        self.counts[2] = self.in_row  # the next interval's longest run starts with the current one
        return self.total - before


def skip_step(accelerator: Accelerator, model: nn.Module, bad: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    """Clip the gradients; 1 (a 0-d float tensor) when the optimiser step must be skipped:
    some process's loss (`bad`, this process's) or the gradient norm is not finite. No
    host sync. Under fp16 the GradScaler judges the gradients itself (it skips an
    overflowing step and lowers its scale; not counted here)."""
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.reshape(1), reduction="sum").reshape(()).clamp(max=1)
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip is not None else None
    if accelerator.scaler is not None:
        return bad
    if norm is None and fsdp.is_sharded(model):
        norm = fsdp.grad_norm(list(model.parameters()))
    if norm is None:
        grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros((), device=bad.device)
    return torch.maximum(bad, (~torch.isfinite(norm)).float().reshape(()))


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor, scaled: bool) -> None:
    """The optimiser step unless `skip` (0-d, 1.0 = skip). A fused AdamW takes the flag on
    the device (the `found_inf` a GradScaler gives it: no update, step count kept), so
    nothing waits for the device; other optimisers read it back. Under fp16 (`scaled`)
    the GradScaler sets the flag itself."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    if scaled:
        optimizer.step()
    elif inner.defaults.get("fused"):
        inner.found_inf = skip.float()
        optimizer.step()
    elif not skip.item():
        optimizer.step()


def adamw(groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where the device has one (CPU, CUDA): one pass over
    each tensor instead of foreach's several (its step took 8 ms against 52 ms for a
    7M-parameter CLIP on the 2-core CPU of BENCHMARKS.md). Same update rule."""
    return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"))


def frozen_copy(model: nn.Module) -> nn.Module:
    """The old model: a copy that is never optimised (eval mode, no gradients)."""
    old = copy.deepcopy(model).eval()
    old.requires_grad_(False)
    return old


def run(cfg: Config, resume: str | None = None, until_phase: int | None = None) -> Path:
    """Train `cfg`'s stream; `resume` = "auto" (= "latest") or a state directory. Returns
    the run dir.

    `until_phase`: stop after that phase (its export, evaluation and resumable state
    written, no summary): modx-bench trains the phases several strategies share this way
    and continues each strategy from the state with `resume`.
    A signal of train.preempt_signals stops every process at the same step boundary with a
    state saved, and raises Preempted (modx.train.preempt)."""
    validate_strategy(cfg.strategy)  # before any directory or process group exists
    with Preemption(cfg.train.preempt_signals) as preemption:
        return _run(cfg, resume, until_phase, preemption)


def _run(cfg: Config, resume: str | None, until_phase: int | None, preemption: Preemption) -> Path:
    t = cfg.train
    run_dir = Path(t.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    accelerator = Accelerator(
        # several processes on a CPU-only machine: gloo (MULTI_CPU); DeepSpeed there too
        **accelerator_options(_has_accelerator(), timeout=timedelta(hours=2)),  # ranks wait for evaluation
        mixed_precision=MIXED_PRECISION[t.precision],
        gradient_accumulation_steps=t.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimiser step, below
        log_with=None if t.tracker == "none" else t.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    check_distributed(accelerator.num_processes)  # before anything is written
    deepspeed = is_deepspeed(accelerator)
    sharding = _sharding(cfg, accelerator)
    if sharding is not None and accelerator.scaler is not None:  # fp16 (on a GPU): sharded gradients
        accelerator.scaler = fsdp.GradScaler.like(accelerator.scaler, accelerator.device)
    if t.tracker == "wandb" and not is_wandb_available():
        raise ConfigError("train.tracker", "wandb is not installed (pip install 'modx[wandb]'), or use tensorboard")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if t.batch_size % world:
        raise ConfigError("train.batch_size", f"{t.batch_size} does not split evenly over {world} processes")
    if deepspeed:
        problem = deepspeed_problem(accelerator, cfg.strategy.name, t.batch_size // world, t.grad_accum, t.grad_clip)
        if problem is not None:
            raise ConfigError(*problem)

    # ---- the stream, the model, the strategy
    with accelerator.main_process_first():
        phases = resolve_phases(cfg)
        zeroshot_sets, held_out_sets = resolve_eval_sets(cfg)
    eval_sets = [(p.name, p.eval) for p in phases]
    val_sets = [(p.name, p.val) for p in phases]  # ("" where a phase has none)
    strategy = build_strategy(cfg.strategy, accelerator, local_loss=t.local_loss)
    if strategy.joint:
        phases = joint_phase(phases)

    set_seed(t.seed)  # the same initial weights on every process
    try:
        model, preprocess_train, preprocess_eval, tokenizer = create_model(
            cfg.model.arch, pretrained=cfg.model.pretrained, trust_torchscript=cfg.model.trust_torchscript)
    except ModelLoadError as err:
        raise ConfigError("model.pretrained" if cfg.model.pretrained else "model.arch", str(err)) from None
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    align_initial = _align_initial(cfg, model)
    random_init = getattr(model, "modx_weights", None) is None  # no retention relative to random weights
    model = strategy.prepare_model(model)  # e.g. adapters, frozen weights: before the optimiser sees them
    if sharding is not None:  # sharded before the optimiser is built over its (sharded) parameters
        model = sharding.shard(model.to(accelerator.device))
    whole = Zero3(model, accelerator.device) if zero_stage(accelerator) >= 3 else None  # ZeRO-3: whole copies
    groups = model_param_groups(model, t.lr, t.weight_decay, ssm_lr=t.ssm_lr, decay_all=t.decay_all)
    optimizer = adamw(fsdp.split_groups(groups) if sharding is not None else groups, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PhaseSchedule(phases, t.lr, t.warmup))
    trim = t.trim_padding and trims_padding(model)  # text batches cut to their longest caption (exact)
    if sharding is not None and accelerator.distributed_type != DistributedType.FSDP:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)  # the model is sharded: no DDP
    else:  # (Accelerate's FSDP2 preparation leaves an already sharded model as it is)
        with broadcast_scalars(deepspeed):  # DeepSpeed: the 0-d logit_scale
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    distributed = {"type": "FSDP" if sharding is not None else accelerator.distributed_type.value,
                   "num_processes": world}
    strategy.bind(Context(cfg, preprocess_train, preprocess_eval, tokenizer, rank, world, accelerator.device,
                          frozen_copy=sharding.frozen_copy if sharding is not None else None,
                          plain_copy=sharding.plain_copy if sharding is not None else None,
                          align_initial=align_initial))
    replay = None  # earlier phases' samples in every batch (modx.data.replay), a share of the global batch
    if replay_ratio(cfg.strategy) > 0:
        replay = ReplayFeed(cfg, phases, rank, world, kl_on_replay=getattr(strategy, "kl_on", "batch") != "batch")
    evaluator = Evaluator(cfg, eval_sets, preprocess_eval, tokenizer, run_dir, accelerator.device,
                          held_out=held_out_sets, zeroshot=zeroshot_sets, val_sets=val_sets,
                          random_init=random_init, accelerator=accelerator)

    # ---- a fresh start, or the state of a killed run
    start_phase, start_step, global_step, old_model = 0, 0, 0, None
    within = None  # a state saved inside a stream segment: where (modx.train.data)
    train_seconds = 0.0  # time in training steps (data waits included, evaluation not)
    bad_steps = BadSteps(t.max_bad_steps, accelerator.device)
    state_path = _resume_path(resume or t.resume, ckpt_dir)
    if state_path is not None:
        trainer_state = read_trainer_state(state_path)
        start_phase, start_step, global_step = (trainer_state[k] for k in ("phase", "phase_step", "global_step"))
        train_seconds = trainer_state.get("train_seconds", 0.0)
        within = trainer_state.get("segment")
        bad_steps = BadSteps(t.max_bad_steps, accelerator.device, trainer_state.get("skipped_steps", 0),
                             trainer_state.get("bad_in_row", 0), (within or {}).get("bad_longest", 0))
        if start_phase > 0 or align_initial:  # the export that ended the previous phase
            previous = f"phase-{start_phase - 1}" if start_phase > 0 else "initial"
            old = create_model(str(ckpt_dir / previous))[0]
            old_model = sharding.frozen(old) if sharding else frozen_copy(old).to(accelerator.device)
        parts = _sharded_parts(sharding, model, optimizer, scheduler)
        strategy_state = load_state(accelerator, state_path, sharded=parts)  # the RNG too: nothing random after it
        strategy.load_state_dict(strategy_state["strategy"])
        if main:  # the counters are global sums, carried on the main process
            strategy.old_samples = trainer_state.get("old_model_samples", 0)
            strategy.extra_samples = trainer_state.get("extra_train_samples", 0)
        if replay is not None and not replay.load(state_path) and strategy_state.get("replay"):
            accelerator.print("note: this checkpoint's replay buffer holds decoded tensors (an older modx); "
                              "it is not resumed: the buffer starts empty")
        if within is not None:
            strategy.resume_within_segment()
            if replay is not None:
                replay.restore(within, accelerator.device)
        accelerator.print(f"resuming {state_path} at phase {start_phase} step {start_step} (global step {global_step})")
        if main:
            evaluator.forget_from(start_phase, global_step)
    elif main:
        if find_latest(ckpt_dir) is not None:
            print(f"note: {run_dir} holds an earlier run; starting over (pass --resume to continue it)")
        forget_states(ckpt_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        evaluator.reset()
        save_config(cfg, run_dir / "config.yaml")
    if state_path is None:
        _export(accelerator, model, sharding, whole, ckpt_dir / "initial")
    if state_path is None and cfg.eval.initial:  # every process embeds its share
        evaluator.evaluate(_eval_view(accelerator, model, sharding, whole), -1, "initial", 0)
    if state_path is None and align_initial:  # phase 0 aligns with the (pretrained) start
        old_model = _old_model(accelerator, model, sharding, whole)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(t.project, config=_flat_hparams(to_dict(cfg)))

    total_steps = sum(p.steps for p in phases)
    progress = tqdm(total=total_steps, initial=global_step, disable=not (main and t.progress), desc="train")
    for phase in phases[start_phase : None if until_phase is None else until_phase + 1]:
        first_step = start_step if phase.index == start_phase else 0
        if first_step == 0:
            optimizer.state.clear()  # each phase starts with fresh AdamW moments, as a new run
        strategy.begin_phase(phase.index, model, old_model)
        segment, read = (first_step, global_step), 0  # where the stream segment started (phase step, global step)
        if within is not None and phase.index == start_phase:  # resumed inside a segment: rebuild it, read on
            segment, read = (within["phase_step"], within["global_step"]), within["batches"]
        batches, plan = _segment(cfg, phase, *segment, preprocess_train, tokenizer, accelerator, trim, replay, skip=read)
        meter = Meter()

        for step in range(first_step, phase.steps):
            step_start = time.perf_counter()
            # ---- one optimiser step = grad_accum micro-batches of the global batch;
            #      skipped (not taken, counted) when the loss or the gradients are not finite,
            #      decided on the device (no host sync per step)
            skip = torch.zeros((), device=accelerator.device)
            for _ in range(t.grad_accum):
                batch = next(batches)  # fresh samples, then this process's replayed ones
                if replay is not None:
                    replay.trained(batch, plan, phase.index, global_step)  # the buffer keeps some
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, terms = strategy.loss(model, batch, old_model)
                    accelerator.backward(loss)  # DeepSpeed: the optimiser step too
                    skip = torch.maximum(skip, (~torch.isfinite(loss.detach())).float())
                    if accelerator.sync_gradients and deepspeed:
                        strategy.before_step(model)  # after DeepSpeed's step: no strategy that edits gradients
                        skip = deepspeed_skipped(model).to(skip.device)  # its own, global, decision
                    elif accelerator.sync_gradients:
                        if sharding is not None:
                            fsdp.sync_replicated_grads(model)
                            accelerator.unscale_gradients()  # fp16: strategies add gradients of their own
                        strategy.before_step(model)
                        skip = skip_step(accelerator, model, skip, t.grad_clip)
                        optimizer_step(optimizer, skip, scaled=accelerator.scaler is not None)
                    optimizer.zero_grad(set_to_none=True)
                meter.add({"loss": loss, **terms}, weight=1 / t.grad_accum)
            lr = scheduler.get_last_lr()[0]  # the lr this step used (logged below)
            scheduler.step()
            logit_scale = accelerator.unwrap_model(model).logit_scale
            with torch.no_grad():
                if not deepspeed:
                    logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                else:  # ZeRO's fp32 copy must follow; under ZeRO-3 each process clamps its partition
                    with gathered([logit_scale], whole is not None):
                        out_of_range = not 0 <= logit_scale.item() <= MAX_LOGIT_SCALE
                    if out_of_range:
                        partition(logit_scale).clamp_(0, MAX_LOGIT_SCALE)
                        refresh_master(accelerator, optimizer)
            global_step += 1
            train_seconds += time.perf_counter() - step_start
            meter.step(samples=t.batch_size * t.grad_accum, skipped=skip)
            bad_steps.update(skip)
            if replay is not None:
                replay.step_done(global_step - 1, skip)
            progress.update(1)
            fault_point("step")

            # ---- log (and read the skipped-step counts: a run of train.max_bad_steps stops)
            if global_step % t.log_every == 0 or step + 1 == phase.steps:
                newly_skipped = bad_steps.read()
                if replay is not None:
                    replay.settle()  # samples of skipped steps leave the buffer
                if newly_skipped:
                    accelerator.print(f"step {global_step}: {newly_skipped} optimiser step(s) since the last log line had a "
                                      f"non-finite loss or gradients and were skipped ({bad_steps.in_row} in a row now)")
                if bad_steps.longest >= bad_steps.limit:
                    _stop_bad_steps(accelerator, ckpt_dir, phase.index, step + 1, global_step, train_seconds,
                                    strategy, replay, t, bad_steps, _sharded_parts(sharding, model, optimizer, scheduler),
                                    _within(segment, global_step, t.ckpt_every, t.grad_accum))
                with gathered([logit_scale], whole is not None):
                    scale = logit_scale.exp().item()
                logs = meter.flush(batches, accelerator) | {
                    "lr": lr,
                    "logit_scale": scale,
                    "phase": phase.index,
                    "skipped_steps": bad_steps.total,
                }
                accelerator.log(logs, step=global_step)
                if not t.progress:
                    accelerator.print(f"step {global_step}/{total_steps} " + " ".join(f"{k} {v:.4g}" for k, v in logs.items()))
                progress.set_postfix(phase=phase.name, loss=f"{logs.get('loss', math.nan):.3f}", sps=f"{logs['samples_per_s']:.0f}")

            # ---- evaluate inside the phase (eval.every: learning curves)
            if evaluator.due(global_step, step, phase.steps):
                evaluator.evaluate(_eval_view(accelerator, model, sharding, whole), phase.index, phase.name, global_step,
                                   in_phase=True)

            # ---- preempted (a signal to any process): every process saves this step's state, stops
            if preemption.requested(world) and step + 1 < phase.steps:
                _checkpoint(accelerator, ckpt_dir, phase.index, step + 1, global_step, train_seconds, strategy,
                            replay, t.keep_checkpoints, bad_steps, _sharded_parts(sharding, model, optimizer, scheduler),
                            _within(segment, global_step, t.ckpt_every, t.grad_accum))
                batches.close()
                _stop_preempted(accelerator, ckpt_dir, phase, step + 1, global_step)

            # ---- checkpoint (the data stream is reseeded from here: see modx.train.data)
            if global_step % t.ckpt_every == 0 and step + 1 < phase.steps:
                _checkpoint(accelerator, ckpt_dir, phase.index, step + 1, global_step, train_seconds, strategy,
                            replay, t.keep_checkpoints, bad_steps, _sharded_parts(sharding, model, optimizer, scheduler))
                batches.close()
                segment = (step + 1, global_step)
                batches, plan = _segment(cfg, phase, *segment, preprocess_train, tokenizer, accelerator, trim, replay)

        # ---- phase end: strategy hook, export, evaluate, snapshot the old model
        strategy.end_phase(phase.index, model, old_model, batches)
        refresh_master(accelerator, optimizer)  # weights the strategy edited (DeepSpeed's fp32 copy)
        batches.close()
        _export(accelerator, model, sharding, whole, ckpt_dir / f"phase-{phase.index}")
        start = time.perf_counter()
        row = evaluator.evaluate(_eval_view(accelerator, model, sharding, whole), phase.index, phase.name,
                                 global_step)  # every process embeds its share
        if main:
            progress.write(f"after phase {phase.index} ({phase.name}): {evaluator.headline(row)}"
                           f"  (evaluated in {time.perf_counter() - start:.0f} s)")
        accelerator.wait_for_everyone()
        old_model = _old_model(accelerator, model, sharding, whole)
        _checkpoint(accelerator, ckpt_dir, phase.index + 1, 0, global_step, train_seconds, strategy, replay,
                    t.keep_checkpoints, bad_steps, _sharded_parts(sharding, model, optimizer, scheduler))
        if phase.index + 1 < len(phases) and preemption.requested(world):  # signalled in the phase's last step
            _stop_preempted(accelerator, ckpt_dir, phases[phase.index + 1], 0, global_step)

    progress.close()
    counters = _counters(accelerator, strategy)  # collective: every process
    if main and (until_phase is None or until_phase + 1 >= len(phases)):
        samples = global_step * t.batch_size * t.grad_accum
        cost = {"train_seconds": train_seconds, "train_samples": samples,
                "samples_per_s": samples / train_seconds if train_seconds else None,
                **counters, **(replay.cost() if replay is not None else {})}
        bad_steps.read()
        evaluator.finish(extra={"skipped_steps": bad_steps.total, "cost": cost, "distributed": distributed})
    accelerator.end_training()
    return run_dir


def _segment(
    cfg: Config, phase: Phase, phase_step: int, global_step: int, preprocess: object, tokenizer: object,
    accelerator: Accelerator, trim: bool = False, replay: ReplayFeed | None = None, skip: int = 0,
) -> tuple[TimedBatches, object]:
    """This process's batches from `phase_step` of `phase` on (a stream segment), and the
    replay plan they follow (None without replay). `skip`: the segment's batches a resumed
    run read past first (it was saved inside the segment: modx.train.data)."""
    plan = replay.plan(phase, global_step, within=skip > 0) if replay is not None else None
    loader = train_loader(
        cfg, phase, preprocess, tokenizer, phase_step=phase_step, global_step=global_step,
        rank=accelerator.process_index, world_size=accelerator.num_processes, replay=plan,
    )
    batches = TimedBatches(loader, accelerator.device, trim=trim)
    batches.skip(skip)
    return batches, plan


def _within(segment: tuple[int, int], global_step: int, ckpt_every: int, grad_accum: int) -> dict[str, int] | None:
    """Where a state saved now is in the stream segment that started at `segment` (phase
    step, global step); None on the periodic schedule, where a new segment starts anyway."""
    if global_step % ckpt_every == 0:
        return None
    return {"phase_step": segment[0], "global_step": segment[1], "batches": (global_step - segment[1]) * grad_accum}


def _checkpoint(
    accelerator: Accelerator,
    ckpt_dir: Path,
    phase: int,
    phase_step: int,
    global_step: int,
    train_seconds: float,
    strategy: object,
    replay: ReplayFeed | None,
    keep: int,
    bad_steps: BadSteps,
    sharded: tuple | None = None,
    within: dict[str, int] | None = None,
) -> None:
    """Save a resumable state. `within`: it is saved inside a stream segment (_within): the
    position in it goes with the state, with what the segment's stream needs (the replay
    buffer's snapshot, the skip flags not read yet, the longest run of bad steps since
    the last log line), so that a resumed run goes on as the uninterrupted run."""
    bad_steps.read()
    if within is not None:
        within = {**within, "bad_longest": bad_steps.longest, **(replay.position() if replay is not None else {})}
    elif replay is not None:
        replay.settle()
    trainer_state = {
        "phase": phase, "phase_step": phase_step, "global_step": global_step,
        "train_seconds": train_seconds, "skipped_steps": bad_steps.total, "bad_in_row": bad_steps.in_row,
        **_counters(accelerator, strategy), **(replay.cost() if replay is not None else {}),
        **({"segment": within} if within is not None else {}),
    }
    strategy_state = {"strategy": strategy.state_dict()}
    save_state(accelerator, ckpt_dir, trainer_state, strategy_state, keep,
               write_main=partial(replay.save, within=within is not None) if replay is not None else None,
               sharded=sharded)


def _counters(accelerator: Accelerator, strategy: object) -> dict[str, int]:
    """Samples the old model ran a forward on, and samples trained with forward + backward
    outside the training steps (EWC's Fisher), over all processes (collective)."""
    local = torch.tensor([strategy.old_samples, strategy.extra_samples], dtype=torch.int64,
                         device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    old, extra = total.tolist()
    return {"old_model_samples": old, "extra_train_samples": extra}


def _stop_bad_steps(
    accelerator: Accelerator, ckpt_dir: Path, phase: int, phase_step: int, global_step: int, train_seconds: float,
    strategy: object, replay: ReplayFeed | None, t: object, bad_steps: BadSteps,
    sharded: tuple | None = None, within: dict[str, int] | None = None,
) -> None:
    """train.max_bad_steps optimiser steps in a row were skipped: save the state and stop.
    A skipped step leaves the model as it was, so the state is the last good step's
    model and optimiser (the run is found at the log line after the limit was reached)."""
    _checkpoint(accelerator, ckpt_dir, phase, phase_step, global_step, train_seconds, strategy, replay,
                t.keep_checkpoints, bad_steps, sharded, within)
    raise TrainingStopped(
        f"training stopped at global step {global_step}: {bad_steps.longest} optimiser steps in a row had "
        f"a non-finite loss or gradients (train.max_bad_steps={t.max_bad_steps}); the model and optimiser "
        f"of the last good step are saved in {find_latest(ckpt_dir)}. Lower train.lr, set train.grad_clip "
        "or use train.precision=bf16/fp32, then resume with --resume"
    )


def _stop_preempted(accelerator: Accelerator, ckpt_dir: Path, phase: Phase, phase_step: int, global_step: int) -> None:
    """A preemption signal: the state of this step is saved (on every process); stop."""
    accelerator.end_training()
    message = (f"preempted at step {phase_step} of phase {phase.index} ({phase.name}), global step {global_step}; "
               f"checkpoint at {find_latest(ckpt_dir)}; resume with train.resume=auto (or --resume)")
    accelerator.print(message)
    raise Preempted(message)


def _sharding(cfg: Config, accelerator: Accelerator) -> fsdp.Sharding | None:
    """How the launch shards the model (modx.train.fsdp), None for replicated training.
    FSDP with one process has nothing to shard: the model trains as it is."""
    strategy = fsdp.requested()
    if strategy is None:
        return None
    if accelerator.num_processes == 1:
        accelerator.print("note: FSDP with one process has nothing to shard; training the whole model")
        return None
    return fsdp.Sharding.create(strategy, accelerator.device)


def _sharded_parts(sharding: fsdp.Sharding | None, model: nn.Module, optimizer: object, scheduler: object) -> tuple | None:
    """(model, torch optimiser, scheduler) for a sharded checkpoint, None when not sharded."""
    if sharding is None:
        return None
    return model, getattr(optimizer, "optimizer", optimizer), scheduler


def _export(accelerator: Accelerator, model: nn.Module, sharding: fsdp.Sharding | None, whole: Zero3 | None,
            directory: Path) -> None:
    """Export the whole model (main process); sharded, its weights are gathered first (collective)."""
    state = fsdp.full_state(model) if sharding is not None else None
    if whole is not None:
        state = whole.state(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        export_phase(accelerator.unwrap_model(model), directory, state=state)


def _eval_view(accelerator: Accelerator, model: nn.Module, sharding: fsdp.Sharding | None,
               whole: Zero3 | None) -> nn.Module:
    """The model evaluation embeds with: sharded (FSDP, ZeRO-3), a whole copy on every process
    (collective), so that each process embeds its share of a set without a collective per forward."""
    if whole is not None:
        return whole.plain_copy(accelerator.unwrap_model(model))
    return sharding.plain_copy(model) if sharding is not None else accelerator.unwrap_model(model)


def _old_model(accelerator: Accelerator, model: nn.Module, sharding: fsdp.Sharding | None,
               whole: Zero3 | None) -> nn.Module:
    """The frozen copy of the model the next phase aligns with (collective when sharded)."""
    if sharding is not None:
        return sharding.frozen_copy(model)
    if whole is not None:
        return whole.frozen_copy(accelerator.unwrap_model(model))
    return frozen_copy(accelerator.unwrap_model(model))


def _align_initial(cfg: Config, model: nn.Module) -> bool:
    """Whether phase 0 has an old model: the initial one (strategy.align_initial; auto = when
    initial weights were loaded, as the authors' script aligns its first phase with the
    pretrained checkpoint)."""
    setting = cfg.strategy.align_initial
    if setting == "auto":
        return getattr(model, "modx_weights", None) is not None
    return bool(setting)


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or (mps is not None and mps.is_available())


def _resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        path = find_latest(ckpt_dir)
        if path is None:
            print(f"note: nothing to resume under {ckpt_dir}; starting a fresh run")
        return path
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError("train.resume", f"{path} is not a modx checkpoint (no trainer_state.json)")
    return path


def _flat_hparams(tree: dict, prefix: str = "") -> dict[str, object]:
    """Flatten the config for the trackers (TensorBoard accepts only scalars and strings)."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out

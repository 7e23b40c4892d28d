"""DeepSpeed ZeRO through Accelerate, on GPUs and on CPU-only machines.

`accelerate launch --use_deepspeed --zero_stage 2 train_modx.py ...` (or an Accelerate
config with `distributed_type: DEEPSPEED`, e.g. `configs/accelerate/deepspeed_zero2.yaml`)
trains with DeepSpeed's ZeRO: stage 1 shards the AdamW states over the processes, stage 2
the gradients too. What modx adds to Accelerate's DeepSpeed path:

- **CPU.** Accelerate turns DeepSpeed off under `cpu=True`, and without it leaves a
  CPU-only process thinking it is process 0 of 1 while DeepSpeed's own process group spans
  all of them. modx starts Accelerate with the gloo backend instead (`accelerator_options`),
  so DeepSpeed's CPU accelerator runs ZeRO over gloo with the right ranks.
- **The config's "auto" values** come from modx's config (`configure_deepspeed`): the
  micro-batch per process, gradient accumulation and clipping (`train.grad_clip`); a
  DeepSpeed config that sets them to other numbers is refused with one line.
- **Skipped steps.** DeepSpeed takes the optimiser step inside `accelerator.backward` and
  skips it itself when the gradient norm is not finite (fp32 and bf16 alike); modx reads
  that decision back (`deepspeed_skipped`) to count it as any other skipped step.
- **Weights edited in place** (the logit-scale clamp, weight ensembling at a phase end):
  ZeRO keeps its own fp32 copy of the weights in the optimiser, which would undo the edit
  at the next step; `refresh_master` copies the model's weights back into it.

Not supported, refused at the start with one line: ZeRO stage 3 (it partitions the
parameters themselves; the old model, the evaluation and the strategies read whole
parameters: use FSDP's FULL_SHARD for sharded parameters) and strategies that need the
gradients themselves (`cmcl` projects them before the step, `ewc` runs backward passes of
its own for its Fisher information): DeepSpeed steps inside backward and owns them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

GRADIENT_STRATEGIES = {  # what DeepSpeed, stepping inside backward and owning the gradients, breaks
    "cmcl": "edits the gradients between backward and the optimiser step",
    "ewc": "computes its Fisher information from backward passes of its own",
}


def deepspeed_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the launcher asked for DeepSpeed (`accelerate launch --use_deepspeed`, or an
    Accelerate config with distributed_type DEEPSPEED)."""
    environ = os.environ if environ is None else environ
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_options(has_device: bool, timeout: timedelta) -> dict[str, Any]:
    """`cpu` and the process-group handler for `Accelerator(...)`: gloo on a CPU-only
    machine (MULTI_CPU), and under DeepSpeed there `cpu=False` with gloo named explicitly
    (Accelerate refuses DeepSpeed under cpu=True)."""
    if deepspeed_requested() and not has_device:
        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]}
    return {"cpu": not has_device, "kwargs_handlers": [InitProcessGroupKwargs(timeout=timeout)]}


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_problem(accelerator: Accelerator, strategy: str, micro_batch: int, grad_accum: int,
                      grad_clip: float | None) -> tuple[str, str] | None:
    """Fill the DeepSpeed config's "auto" values from modx's config; (config key, reason)
    when the run cannot go on under DeepSpeed, else None."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        return ("train", "DeepSpeed ZeRO stage 3 partitions the parameters, and the old model, the evaluation "
                "and the strategies read whole ones: use stage 1 or 2, or FSDP's FULL_SHARD "
                "(accelerate launch --use_fsdp) for sharded parameters")
    if strategy in GRADIENT_STRATEGIES:
        return ("strategy.name", f"{strategy} {GRADIENT_STRATEGIES[strategy]}, and DeepSpeed steps inside "
                "backward and owns the gradients: run it with DDP or FSDP")
    if ds.get("fp16", {}).get("enabled") is True or ds.get("bf16", {}).get("enabled") is True:
        if accelerator.mixed_precision == "no":
            return ("train.precision", "the DeepSpeed config enables fp16/bf16 while train.precision is fp32: "
                    "set train.precision to match (Accelerate passes it on to DeepSpeed)")
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": grad_clip if grad_clip is not None else 0.0}
    keys = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
            "gradient_clipping": "train.grad_clip"}
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given == "auto" or given is None:
            ds[key] = value
        elif float(given) != float(value):
            return (keys[key], f"the DeepSpeed config sets {key}={given} where modx's config gives {value}: "
                    "set it to \"auto\" there (modx fills it in) or make the two agree")
    ds.pop("train_batch_size", None)  # DeepSpeed derives it (micro-batch x accumulation x processes)
    ds.setdefault("zero_allow_untested_optimizer", True)  # modx's AdamW (fused where the device has it)
    return None


def deepspeed_skipped(model: torch.nn.Module) -> torch.Tensor:
    """1.0 (0-d) when DeepSpeed's last step was skipped (a non-finite gradient norm)."""
    optimizer = getattr(model, "optimizer", None)  # the DeepSpeedEngine's ZeRO optimiser
    return torch.tensor(float(bool(getattr(optimizer, "overflow", False))))


def refresh_master(accelerator: Accelerator, optimizer: object) -> None:
    """After an in-place edit of the model's weights: copy them into ZeRO's fp32 copy."""
    if not is_deepspeed(accelerator):
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> ZeRO's optimiser
    refresh = getattr(inner, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()


@contextmanager
def broadcast_scalars(active: bool) -> Iterator[None]:
    """While DeepSpeed wraps the model: its start-up broadcast of the weights views every
    parameter as bytes, which a 0-d tensor (CLIP's logit_scale) cannot be (DeepSpeed 0.19:
    "self.dim() cannot be 0 to view Float as Byte"). The same broadcast here, each
    parameter seen as 1-d (the same storage)."""
    if not active:
        yield
        return
    from deepspeed import comm as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups

    original = DeepSpeedEngine._broadcast_model

    def broadcast_model(engine: DeepSpeedEngine) -> None:
        for p in engine.module.parameters():
            if getattr(p, "ds_status", None) is None and not hasattr(p, "ds_optim_param"):
                dist.broadcast(p.data.reshape(-1).view(torch.uint8), groups._get_broadcast_src_rank(),
                               group=engine.seq_data_parallel_group)

    DeepSpeedEngine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original

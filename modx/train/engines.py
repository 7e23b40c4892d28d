"""DeepSpeed ZeRO through Accelerate, on GPUs and on CPU-only machines.

`accelerate launch --use_deepspeed --zero_stage 2 train_modx.py ...` (or an Accelerate
config with `distributed_type: DEEPSPEED`, e.g. `configs/accelerate/deepspeed_zero2.yaml`)
trains with DeepSpeed's ZeRO: stage 1 shards the AdamW states over the processes, stage 2
the gradients too, stage 3 the parameters as well. What modx adds to Accelerate's
DeepSpeed path:

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
- **ZeRO-3** partitions the parameters themselves. What modx reads whole outside the
  engine's forward gets a whole copy gathered from the partitions (`Zero3`): evaluation, the
  phase exports and the old model of Mod-X / distill (a whole frozen copy per process, unlike
  FSDP); the logit scale is read gathered and clamped in each partition (`gathered`,
  `partition`). Strategies that edit or follow the whole weights (ZERO3_REFUSED) are refused.

Refused at the start with one line under every stage: strategies that need the gradients
themselves (`cmcl` projects them before the step, `ewc` runs backward passes of its own for
its Fisher information): DeepSpeed steps inside backward and owns them.
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

ZERO3_REFUSED = {  # what reads or edits the weights themselves while ZeRO-3 holds 1/N of each
    "wiseft": "interpolates the whole weights at each phase end",
    "zscl": "pulls the weights towards the initial ones at every step and ensembles them",
    "ctp": "keeps a momentum copy of the weights, updated from them at every step",
    "cclip": "merges its LoRA adapters into the weights at each phase end",
}
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
    if stage >= 3 and strategy in ZERO3_REFUSED:
        return ("strategy.name", f"{strategy} {ZERO3_REFUSED[strategy]}, which DeepSpeed ZeRO-3 partitions over "
                "the processes: run it with ZeRO stage 1 or 2, or FSDP's FULL_SHARD (accelerate launch "
                "--use_fsdp --fsdp_version 2), which shards it")
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
    "self.dim() cannot be 0 to view Float as Byte"), and so does ZeRO-3's partitioning of
    each parameter. The same broadcasts here, each parameter seen as 1-d (the same storage)."""
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

    from deepspeed.runtime.zero.partition_parameters import Init

    init_original = Init._zero_init_param

    def zero_init_param(self: Init, param: torch.nn.Parameter) -> None:  # ZeRO-3's partitioning
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(-1).view(torch.uint8), src, group)
        param.partition()

    DeepSpeedEngine._broadcast_model = broadcast_model
    Init._zero_init_param = zero_init_param
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original
        Init._zero_init_param = init_original


# ---- ZeRO-3: the parameters partitioned; whole copies where modx reads them outside the forward


def zero_stage(accelerator: Accelerator) -> int:
    """The launch's ZeRO stage (0 without DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


class Zero3:
    """Whole copies of a model whose parameters ZeRO-3 partitions (each process holds 1/N of
    every parameter; DeepSpeed's hooks gather a module's parameters for its forward only).
    What modx reads outside the engine's forward gets a whole copy, made from the gathered
    weights (collective): evaluation embeds with one on every process (each its share of a
    set, as under FSDP), a phase export writes one, and the old model of Mod-X and distill is
    one, frozen (on every process: DeepSpeed's single-model path through Accelerate has no
    partitioned frozen model; FSDP's FULL_SHARD shards it too)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from modx.train.fsdp import meta_copy

        self.template = meta_copy(model)  # the bare model's structure, no storage
        self.device = device

    @staticmethod
    def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole weights (and buffers) of the unwrapped `model`, on every process. Collective."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def plain_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A whole, unpartitioned copy of the unwrapped `model` on every process (collective)."""
        import copy

        plain = copy.deepcopy(self.template).to_empty(device=self.device)
        state = self.state(model)
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            plain.load_state_dict(state, strict=False)
            for name, b in plain.named_buffers():  # non-persistent buffers are not in the state
                b.copy_(buffers[name])
        return plain.train(model.training)

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """The old model: a whole copy of `model`, eval mode, no gradients (collective)."""
        return self.plain_copy(model).eval().requires_grad_(False)


@contextmanager
def gathered(parameters: list[torch.nn.Parameter], zero3: bool) -> Iterator[None]:
    """`parameters` whole inside the block, to read (under ZeRO-3 gathered from the
    processes' partitions, collective; an edit inside the block is refused by DeepSpeed:
    edit `partition(p)`)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


def partition(p: torch.nn.Parameter) -> torch.Tensor:
    """This process's part of `p` (ZeRO-3's partition, padded), or `p` itself when whole:
    elementwise edits (a clamp) go here, then `refresh_master` copies them into ZeRO's fp32 one."""
    return getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p

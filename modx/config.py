"""The typed configuration tree of a modx run: YAML file + dotted overrides, validated.

    cfg = load_config("configs/demo.yaml", ["train.lr=1e-3", "stream.phases.0.steps=50"])

Every key is a dataclass field below; an unknown key, a value of the wrong type or an
impossible value raises `ConfigError`, whose message names the key (train_modx.py turns it
into one line on stderr and exit status 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("fp32", "fp16", "bf16")
SOURCES = ("stream", "buffer")  # strategy.replay.source (modx.data.replay)
SCHEDULES = ("equal", "all", "exp")  # strategy.replay.schedule
TRACKERS = ("tensorboard", "wandb", "none")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")  # train.preempt_signals
REDUCTIONS = ("sum", "mean")


class ConfigError(ValueError):
    """A configuration problem a user can fix; `key` is the dotted key at fault."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


@dataclass
class ModelConfig:
    arch: str = "modx-tiny-s4d"  # open_clip name, local-dir:PATH, modx config name or export dir
    pretrained: str | None = None  # open_clip tag or a local file/directory (never downloaded)
    grad_checkpointing: bool = False
    trust_torchscript: bool = False  # load a TorchScript `pretrained` archive (loading one runs its code)


@dataclass
class ReplayConfig:
    ratio: float | None = None  # share of the GLOBAL batch replayed from earlier phases (None: the
    #                             strategy's default: 0.25 for `modx`, 0.5 for `replay`, else 0)
    source: str = "buffer"  # stream: re-read earlier phases' shards | buffer: a reservoir of encoded samples
    schedule: str = "equal"  # stream: the share of each earlier phase: equal | all (by size) | exp
    data: str | None = None  # stream: more shards to replay from the first phase on (e.g. pretraining data)
    size: int = 1000  # buffer: capacity in samples (one buffer for all processes, held by each)
    max_mb: float = 1024.0  # buffer: bound on the samples' encoded bytes, in MiB


@dataclass
class StrategyConfig:
    name: str = "modx"  # finetune | modx | distill | ewc | replay | wiseft | joint | zscl | ctp | cclip | cmcl
    alpha: float | None = None  # weight of the Mod-X / distillation KL (None: 20 for the KL over
    #                             the batch, as the paper; 5 for the KL over replayed samples)
    temperature: float = 1.0  # tau inside the KL (1 = raw cosine similarities, as the reference)
    cognition_align: bool = True  # Mod-X selective alignment of the old model's wrong rows
    reduction: str = "sum"  # KL summed over the batch (reference script) or averaged
    kl_diagonal: bool = True  # KL over whole rows (paper); false: over the other samples only
    kl_on: str = "auto"  # samples the KL covers: batch (paper) | replay (the replayed ones only) |
    #                      auto (replay when a replay buffer is on, else batch)
    teacher_cache: bool = False  # Mod-X: the old model's features of a replayed view computed once per
    #                              phase (keyed by the view's input; pays only when views repeat, i.e.
    #                              a training transform without random augmentation)
    align_initial: bool | str = "auto"  # phase 0 aligns with the initial model (auto: when
    #                                      its weights were loaded, as the authors' script)
    ewc_lambda: float = 1000.0  # weight of the EWC quadratic penalty
    ewc_batches: int = 10  # batches used to estimate the diagonal Fisher at each phase end
    wiseft_alpha: float = 0.5  # weight of the new model when interpolating at a phase end
    # ---- cclip (C-CLIP, docs/training.md): LoRA + contrastive knowledge consolidation
    cclip_lora: bool = True  # LoRA on the towers' sequence backbones, merged at each phase end; false: all train
    cclip_lora_rank: int = 16  # LoRA rank r (the authors')
    cclip_lora_alpha: float = 32.0  # LoRA alpha: the update is alpha / r x B A
    cclip_lora_dropout: float = 0.1  # dropout on the adapters' input
    cclip_hidden: int = 2048  # hidden width of the CKC predictor (Linear -> BatchNorm -> ReLU -> Linear)
    cclip_weight: float = 1.0  # weight of the CKC loss beside the CLIP loss
    # ---- cmcl (CMCL, docs/training.md): dual-sided null-space gradient projection
    cmcl_train: str = "heads"  # heads: only the two projection heads train (the authors' frozen encoders) | all
    cmcl_lambda_min: float = 0.1  # input side: keep the directions whose eigenvalue (unit-norm features) exceeds it
    cmcl_lambda_min_out: float = 0.0  # output side: the same for the other modality's projected features
    cmcl_batches: int = 10  # batches whose features are added to the statistics at each phase end
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    # ---- zscl (Zheng et al., ICCV 2023; defaults: the authors' scripts/ZSCL.sh, docs/training.md)
    reference: str | None = None  # reference image-text shard URLs the distillation runs on (zscl: required)
    zscl_batch: int | None = None  # GLOBAL reference batch per forward (None: train.batch_size, as the authors)
    zscl_temperature: float = 2.0  # T of the distillation (--T 2), loss scaled by T^2
    zscl_image_weight: float = 1.0  # weight of the image-side distillation (--image_loss)
    zscl_text_weight: float = 1.0  # weight of the text-side distillation (--text_loss)
    zscl_l2: float = 1.0  # weight of sum (p - p_phase_start)^2 (--l2 1); 0: off
    zscl_we_every: int = 100  # weight ensemble: average the weights every N optimiser steps (--avg_freq); 0: off
    # ---- ctp (Zhu et al., ICCV 2023; defaults: the authors' models/clip_pretrain.py, docs/training.md)
    ctp_queue_size: int = 1024  # momentum features kept as extra negatives (per modality)
    ctp_momentum: float = 0.995  # EMA of the momentum model while there is no old model
    ctp_compatible_momentum: float = 0.9  # with an old model: m <- c m + (1 - c)/2 (new + old)
    ctp_temperature: float = 0.07  # tau of the momentum contrast and the topology KL
    ctp_contrast_weight: float = 1.0  # weight of the momentum contrast (i2t + t2i)/2
    ctp_topology_weight: float = 1.0  # weight of each topology term: cross-modal and same-modal KL


@dataclass
class PhaseConfig:
    name: str = ""
    train: str = ""  # training shard URLs (brace expansion, `::` joins sources)
    eval: str = ""  # evaluation (test) shard URLs
    val: str = ""  # validation shard URLs, disjoint from train and eval (model selection: modx-bench --select)
    builtin: str | list[str] | None = None  # modx.data.builtin dataset(s) whose shards are built when
    #                                         missing; a list mixes their training data in equal shares
    classes: list[str] | None = None  # a narrow subset of the (one) builtin dataset: its "class" values
    steps: int | None = None  # budget in optimiser steps ...
    samples: int | None = None  # ... or in training samples (global)
    lr: float | None = None  # per-phase peak learning rate (default train.lr)


@dataclass
class StreamConfig:
    phases: list[PhaseConfig] = field(default_factory=list)
    data_root: str = "data"  # where built-in datasets are built


@dataclass
class TrainConfig:
    batch_size: int = 64  # GLOBAL batch per forward pass (split evenly across processes)
    lr: float = 5.0e-4
    weight_decay: float = 0.1
    decay_all: bool = False  # weight decay on every parameter (the Mod-X script), not open_clip's groups
    warmup: float = 0.2  # linear warm-up, fraction of each phase's steps, then cosine to 0
    ssm_lr: float | None = None  # learning rate of SSM parameters (dt, A, B); None: train.lr
    precision: str = "fp32"  # fp32 | fp16 | bf16
    grad_accum: int = 1  # gradient accumulation steps per optimiser step
    grad_clip: float | None = 1.0  # max global grad norm (None: no clipping)
    local_loss: bool = True  # each process scores its rows against the gathered columns (exact, O(b x B))
    trim_padding: bool = True  # cut text batches to their longest caption where exact (modx.models.text)
    workers: int = 2  # data loader workers per process
    shuffle: int = 1000  # shuffle buffer of the training stream
    seed: int = 0
    output_dir: str = "runs/demo"
    log_every: int = 10  # optimiser steps between log lines
    ckpt_every: int = 100  # optimiser steps between checkpoints (and at every phase end)
    keep_checkpoints: int = 2  # resumable states kept on disk
    max_bad_steps: int = 10  # non-finite steps in a row (each skipped) before training stops
    resume: str | None = None  # auto (= latest: resume if a checkpoint exists, else start) or a state dir
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # stop, save, exit 0
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    project: str = "modx"  # tracker project name
    progress: bool = True  # tqdm bar on the main process


@dataclass
class ZeroShotSetConfig:
    name: str = ""  # default: the directory's name, or BUILTIN-zs
    data: str = ""  # a CLIP_benchmark classification directory (classnames.txt, templates, test/)
    builtin: str | None = None  # or a built-in dataset's zero-shot set (built under stream.data_root)
    classes: list[str] | None = None  # builtin: only these classes (e.g. ones no phase trains on)


@dataclass
class RetrievalSetConfig:
    name: str = ""  # default: the built-in's name, or set<i>
    data: str = ""  # eval shard URLs, or a CLIP_benchmark retrieval directory
    builtin: str | None = None  # or a built-in dataset's test split


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    backend: str = "faiss"  # faiss | torch
    probe: int = 1000  # image-text pairs of the fixed spatial-disorder probe
    batch_size: int = 128
    workers: int = 0
    initial: bool = True  # also evaluate the model before training (phase -1)
    report: bool = True  # write report.md / report.html at the end
    reference: str | None = None  # summary.json of another run on this stream (e.g. fine-tuning)
    #                               printed beside this run's; relative: to the config file
    every: int = 0  # also evaluate every N optimiser steps inside a phase (0: phase ends only)
    retention_from: str = "initial"  # zero-shot retention relative to: the initial model (omitted when
    #                                  its weights are random) or the model after the phase of this name
    zeroshot: list[ZeroShotSetConfig] = field(default_factory=list)  # zero-shot classification sets
    retrieval: list[RetrievalSetConfig] = field(default_factory=list)  # held-out retrieval sets


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML `path` (None: all defaults), apply `a.b=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError("--config", f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(Config, raw, "")
    reference = cfg.eval.reference
    if reference and path is not None and not Path(reference).is_absolute() and (path.parent / reference).is_file():
        cfg.eval.reference = str(path.parent / reference)
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw`; list items by index (`stream.phases.0.steps`)."""
    if "=" not in item:
        raise ConfigError(item, "overrides are written key=value, e.g. train.lr=1e-3")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(where, f"list index out of range (the list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(where, "is not a mapping or a list")


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from mapping `raw`, checking keys and types (messages name the key)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
            raise ConfigError(_join(prefix, str(key)), f"unknown key{hint}")
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    return cls(**values)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (with friendly number parsing) and convert it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and (
            value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        ):
            return None
        for arg in args[:-1]:  # the first type that fits, e.g. bool | str
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        return _coerce(args[-1], value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise ConfigError(key, f"unsupported type {tp}")


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check values that types alone cannot (ranges, choices, the shape of the stream).

    strategy.name is checked by the strategy registry (`modx.strategies.validate_strategy`),
    which imports this module: config stays below the strategies."""

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(key, message)

    s, t, e = cfg.strategy, cfg.train, cfg.eval
    check(s.alpha is None or s.alpha >= 0, "strategy.alpha", "must be >= 0")
    check(s.temperature > 0, "strategy.temperature", "must be > 0")
    check(s.reduction in REDUCTIONS, "strategy.reduction", f"choose one of {list(REDUCTIONS)}")
    check(s.align_initial in (True, False, "auto"), "strategy.align_initial", "choose auto, true or false")
    check(s.kl_on in ("auto", "batch", "replay"), "strategy.kl_on", "choose auto, batch or replay")
    check(s.ewc_batches > 0, "strategy.ewc_batches", "must be > 0")
    check(0.0 <= s.wiseft_alpha <= 1.0, "strategy.wiseft_alpha", "must be in [0, 1]")
    # ---- zscl
    check(s.name != "zscl" or bool(s.reference and s.reference.strip()), "strategy.reference",
          "zscl distils on reference data: give image-text shard URLs (e.g. a slice of the pretraining data)")
    check(s.zscl_batch is None or s.zscl_batch > 0, "strategy.zscl_batch", "must be > 0 (or null: train.batch_size)")
    check(s.zscl_temperature > 0, "strategy.zscl_temperature", "must be > 0")
    check(s.zscl_image_weight >= 0, "strategy.zscl_image_weight", "must be >= 0")
    check(s.zscl_text_weight >= 0, "strategy.zscl_text_weight", "must be >= 0")
    check(s.zscl_l2 >= 0, "strategy.zscl_l2", "must be >= 0")
    check(s.zscl_we_every >= 0, "strategy.zscl_we_every", "must be >= 0 (0: no weight ensemble)")
    # ---- ctp
    check(s.ctp_queue_size > 0, "strategy.ctp_queue_size", "must be > 0")
    check(s.name != "ctp" or s.ctp_queue_size >= cfg.train.batch_size, "strategy.ctp_queue_size",
          f"must hold at least one global batch (train.batch_size = {cfg.train.batch_size})")
    check(0.0 <= s.ctp_momentum < 1.0, "strategy.ctp_momentum", "must be in [0, 1)")
    check(0.0 <= s.ctp_compatible_momentum < 1.0, "strategy.ctp_compatible_momentum", "must be in [0, 1)")
    check(s.ctp_temperature > 0, "strategy.ctp_temperature", "must be > 0")
    check(s.ctp_contrast_weight >= 0, "strategy.ctp_contrast_weight", "must be >= 0")
    check(s.ctp_topology_weight >= 0, "strategy.ctp_topology_weight", "must be >= 0")
    # ---- cclip
    check(s.cclip_lora_rank > 0, "strategy.cclip_lora_rank", "must be > 0")
    check(s.cclip_lora_alpha > 0, "strategy.cclip_lora_alpha", "must be > 0")
    check(0.0 <= s.cclip_lora_dropout < 1.0, "strategy.cclip_lora_dropout", "must be in [0, 1)")
    check(s.cclip_hidden > 0, "strategy.cclip_hidden", "must be > 0")
    check(s.cclip_weight >= 0, "strategy.cclip_weight", "must be >= 0")
    # ---- cmcl
    check(s.cmcl_train in ("heads", "all"), "strategy.cmcl_train", "choose heads or all")
    check(s.cmcl_lambda_min >= 0, "strategy.cmcl_lambda_min", "must be >= 0")
    check(s.cmcl_lambda_min_out >= 0, "strategy.cmcl_lambda_min_out", "must be >= 0")
    check(s.cmcl_batches > 0, "strategy.cmcl_batches", "must be > 0")
    ratio = s.replay.ratio
    check(ratio is None or 0.0 <= ratio < 1.0, "strategy.replay.ratio", "must be in [0, 1)")
    check(s.replay.size > 0, "strategy.replay.size", "must be > 0")
    check(s.replay.source in SOURCES, "strategy.replay.source", f"choose one of {list(SOURCES)}")
    check(s.replay.schedule in SCHEDULES, "strategy.replay.schedule", f"choose one of {list(SCHEDULES)}")
    check(s.replay.max_mb > 0, "strategy.replay.max_mb", "must be > 0")
    check(not s.replay.data or s.replay.source == "stream", "strategy.replay.data",
          "replaying shards of your own needs strategy.replay.source=stream")
    check(not s.replay.data or ratio != 0.0, "strategy.replay.data",
          "set strategy.replay.ratio > 0 to replay these shards")

    phases = cfg.stream.phases
    check(len(phases) > 0, "stream.phases", "the stream needs at least one phase")
    names = set()
    for i, p in enumerate(phases):
        key = f"stream.phases.{i}"
        if isinstance(p.builtin, list):
            check(len(p.builtin) > 0, f"{key}.builtin", "give a dataset name or a non-empty list of names")
            check(p.classes is None, f"{key}.classes", "a class subset needs one builtin dataset, not a list")
        check(p.classes is None or p.builtin is not None, f"{key}.classes", "a class subset needs a builtin dataset")
        if not p.name:
            p.name = _builtin_name(p.builtin, p.classes) if p.builtin else f"phase{i}"
        check(p.name not in names, f"{key}.name", f"duplicate phase name {p.name!r}")
        names.add(p.name)
        check((p.steps is None) != (p.samples is None), key, "give exactly one budget: steps or samples")
        check(p.steps is None or p.steps > 0, f"{key}.steps", "must be > 0")
        check(p.samples is None or p.samples > 0, f"{key}.samples", "must be > 0")
        check(p.lr is None or p.lr > 0, f"{key}.lr", "must be > 0")
        check(bool(p.train) or p.builtin is not None, f"{key}.train", "give train shard URLs or a builtin dataset")
        check(bool(p.eval) or p.builtin is not None, f"{key}.eval", "give eval shard URLs or a builtin dataset")

    check(t.batch_size > 0, "train.batch_size", "must be > 0")
    check(t.lr > 0, "train.lr", "must be > 0")
    check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(0.0 <= t.warmup < 1.0, "train.warmup", "must be in [0, 1)")
    check(t.ssm_lr is None or t.ssm_lr > 0, "train.ssm_lr", "must be > 0")
    check(t.precision in PRECISIONS, "train.precision", f"choose one of {list(PRECISIONS)}")
    check(t.grad_accum > 0, "train.grad_accum", "must be > 0")
    check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be > 0 (or null)")
    check(t.workers >= 0, "train.workers", "must be >= 0")
    check(t.shuffle >= 0, "train.shuffle", "must be >= 0")
    check(t.log_every > 0, "train.log_every", "must be > 0")
    check(t.ckpt_every > 0, "train.ckpt_every", "must be > 0")
    check(t.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0")
    check(t.max_bad_steps > 0, "train.max_bad_steps", "must be > 0")
    check(t.tracker in TRACKERS, "train.tracker", f"choose one of {list(TRACKERS)}")
    for name in t.preempt_signals:
        check(name in PREEMPT_SIGNALS, "train.preempt_signals", f"unknown signal {name!r}; choose from {list(PREEMPT_SIGNALS)}")
    check(bool(t.output_dir), "train.output_dir", "must not be empty")

    check(len(e.ks) > 0 and all(k > 0 for k in e.ks), "eval.ks", "must be a non-empty list of positive integers")
    check(e.backend in ("faiss", "torch"), "eval.backend", "choose faiss or torch")
    check(e.probe >= 0, "eval.probe", "must be >= 0")
    check(e.batch_size > 0, "eval.batch_size", "must be > 0")
    check(e.workers >= 0, "eval.workers", "must be >= 0")
    check(not e.reference or Path(e.reference).is_file(), "eval.reference", f"file not found: {e.reference}")
    check(e.every >= 0, "eval.every", "must be >= 0 (0: evaluate at phase ends only)")
    taken = set(names)
    for group, sets in (("zeroshot", e.zeroshot), ("retrieval", e.retrieval)):
        for i, item in enumerate(sets):
            key = f"eval.{group}.{i}"
            check(bool(item.data) != (item.builtin is not None), key, "give exactly one of data or builtin")
            classes = getattr(item, "classes", None)
            check(classes is None or item.builtin is not None, f"{key}.classes", "a class subset needs a builtin dataset")
            if not item.name:
                default = Path(item.data.rstrip("/")).name if group == "zeroshot" and item.data else f"{group}{i}"
                suffix = "-zs" if group == "zeroshot" else "-heldout"
                item.name = _builtin_name(item.builtin, classes) + suffix if item.builtin else default
            check(item.name not in taken, f"{key}.name", f"duplicate eval set name {item.name!r} (phases and eval sets need distinct names)")
            taken.add(item.name)
    check(e.retention_from == "initial" or e.retention_from in names, "eval.retention_from",
          f"choose initial or a phase name ({', '.join(sorted(names))})")


def _builtin_name(builtin: str | list[str], classes: list[str] | None) -> str:
    """Default name of a built-in phase or eval set: `digits`, `digits+shapes`, `digits.zero+one`."""
    if isinstance(builtin, list):
        return "+".join(builtin)
    return f"{builtin}.{'+'.join(classes)}" if classes else builtin


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

"""modx-bench: continual strategies side by side on one stream from one start.

    modx-bench --config configs/bench_stream.yaml --strategies finetune modx modx:alpha=5 \\
        --seeds 0 1 --out runs/bench [key=value ...]
    modx-bench --config configs/bench_stream.yaml --select "modx:alpha=1,5;replay.ratio=0.25,0.5" \\
        --seeds 0 --out runs/select      # tune on the val sets: modx.train.select

Each strategy spec is `NAME[:key=value,...]`; a bare key is a `strategy.` key
(`modx:alpha=5,replay.ratio=0.2`), a dotted key from another section is taken as it is
(`modx:train.lr=1e-3`). Trailing `key=value` overrides apply to every run.

Every run is `modx.train.run` on the same config (and the same seed), so every strategy
starts from the same weights and sees the same stream. Phases that several strategies train
exactly as plain fine-tuning (the first phase when there is no old model yet, see
`Strategy.plain_phases`) are trained once, in `OUT/shared/`, and each strategy goes on from
that state (its run directory starts as a copy, then `run(..., resume="latest")`). Each
training runs in a child process so that its wall time and peak memory are its own. A
killed bench continues where it stopped: finished runs are kept, an interrupted one resumes
from its latest checkpoint.

Every run and shared directory records the config it was trained with (`bench_config.json`
= {"hash": sha1 of the resolved config as sorted JSON without train.output_dir, "config"},
a fork also {"forked_from": {"dir", "hash"}}), written before it trains. A directory whose
record differs from the planned config, or that has results but no record, is stale: it is
retrained from scratch (one line names it and the differing keys), and so is every fork of
a retrained shared directory; `--reuse` keeps stale directories as they are.

Every training child is an attempt: it rewrites `bench_attempt.json` (start, elapsed_s,
peak_rss_mb, finished) every 10 s and at its end; the bench appends each attempt to the
directory's `bench_attempts.jsonl` (start, wall_s, peak_rss_mb, finished), folding in first
the heartbeat that a killed bench left behind. `bench_cost.json` marks a finished training
with its directory's own totals.

Writes `OUT/bench.json` = {"runs": [{"strategy", "seed", "summary", "cost", "run_dir"}],
"table": per-strategy mean and std over seeds} and `OUT/report.{md,html}` (tables, plots);
`OUT/compare/` holds modx-report's side-by-side report of the first seed's runs. A run's
cost: wall_s summed and peak_rss_mb the max over every attempt of its shared phases and its
own, `attempts` their number; train_tflops from the forwards summary.json counts
(train_samples, extra_train_samples, old_model_samples), or, without old_model_samples (an
older modx), estimated from the config (`train_tflops_estimated`: true).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modx.config import Config, ConfigError, StrategyConfig, load_config, save_config, to_dict
from modx.train.evaluate import headline
from modx.train.preempt import Preempted

SECTIONS = ("model", "strategy", "stream", "train", "eval")
# The continual numbers the bench table shows: (summary key, column title).
SUMMARY_COLUMNS = (
    ("average_recall", "average"),
    ("first_last", "first domain, final"),
    ("plasticity", "plasticity"),
    ("forgetting", "forgetting"),
    ("backward_transfer", "BWT"),
    ("forward_transfer", "FWT"),
)
# Shown when a run has them: mean recall on the val sets after the last phase (what
# --select ranks by), zero-shot retention (% of the eval.retention_from model's accuracy kept).
OPTIONAL_COLUMNS = (
    ("val_average", "val average"),
    ("zeroshot_retention", "zero-shot retention"),
)
# Every strategy's average recall against this one's, paired by seed (bench.json "difference").
BASELINE = "finetune"
CONFIDENCE = 0.95
COST_COLUMNS = (
    ("wall_s", "wall (s)"),
    ("samples_per_s", "samples/s"),
    ("peak_rss_mb", "peak RSS (MB)"),
    ("train_tflops", "train TFLOP"),
)
# What the bench keeps in a run (or shared) directory beside modx.train.run's files.
RECORD = "bench_config.json"  # {"hash", "config"}: the resolved config it was trained with
ATTEMPTS = "bench_attempts.jsonl"  # one line per training child: start, wall_s, peak_rss_mb, finished
HEARTBEAT = "bench_attempt.json"  # the running child's attempt so far, rewritten every HEARTBEAT_S
PREEMPTED_EXIT = 75  # a training child stopped by a preemption signal (EX_TEMPFAIL), its state saved
COST = "bench_cost.json"  # the directory's own cost over its attempts, once its training finished
HEARTBEAT_S = 10.0


class BenchError(ValueError):
    """A bench request that cannot run (the message says why)."""


@dataclass
class BenchRun:
    label: str  # the spec as given, e.g. "modx:alpha=5"
    seed: int
    cfg: Config
    run_dir: Path
    shared: int = 0  # leading phases trained in a shared run
    shared_dir: Path | None = None
    shared_replay: float = 0.0  # replay ratio of the shared run: > 0 when it fills a replay buffer
    cost: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- planning


def strategy_overrides(spec: str) -> list[str]:
    """`modx:alpha=5,replay.ratio=0.2` -> ["strategy.name=modx", "strategy.alpha=5", ...]."""
    name, _, options = spec.partition(":")
    if not name:
        raise BenchError(f"strategy spec {spec!r}: no strategy name before ':'")
    out = [f"strategy.name={name}"]
    for item in filter(None, re.split(r",(?=[A-Za-z_][\w.]*=)", options)):
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"strategy spec {spec!r}: options are written key=value, got {item!r}")
        key = key.strip()
        out.append(f"{key if key.split('.')[0] in SECTIONS else 'strategy.' + key}={value}")
    return out


def split_arguments(strategies: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """argparse puts trailing `key=value` overrides into --strategies: take them back out
    (a strategy spec never has '=' before a ':')."""
    specs, extra = [], list(overrides)
    for token in strategies:
        (extra if re.match(r"^[A-Za-z_][\w.]*=", token) else specs).append(token)
    return specs, extra


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def plan(config: str | None, specs: Sequence[str], seeds: Sequence[int], out: Path,
         overrides: Sequence[str] = ()) -> list[BenchRun]:
    """One BenchRun per (strategy, seed), with the phases it shares assigned to a shared run."""
    from modx.strategies import STRATEGIES, replay_ratio, validate_strategy

    if not specs:
        raise BenchError("no strategy given (--strategies finetune modx ...)")
    if len(set(specs)) != len(specs):
        raise BenchError("a strategy spec is given twice")
    runs = []
    for spec in specs:
        for seed in seeds:
            run_dir = out / "runs" / f"{slug(spec)}-seed{seed}"
            try:
                cfg = load_config(config, [*overrides, *strategy_overrides(spec), f"train.seed={seed}",
                                           f"train.output_dir={run_dir}"])
                validate_strategy(cfg.strategy)
            except ConfigError as err:
                raise BenchError(f"strategy {spec!r}: {err}") from None
            runs.append(BenchRun(spec, seed, cfg, run_dir))
    groups: dict[str, list[BenchRun]] = {}
    for r in runs:
        n = STRATEGIES[r.cfg.strategy.name].plain_phases(r.cfg.strategy, _aligns_initial(r.cfg))
        n = len(r.cfg.stream.phases) if n is None else n
        if replay_ratio(r.cfg.strategy) > 0:  # nothing to replay during the first phase only,
            n = 0 if r.cfg.strategy.replay.data else min(n, 1)  # unless shards of the user's
        if n > 0 and len(r.cfg.stream.phases) > 1:
            groups.setdefault(_prefix_key(r.cfg), []).append(r)
    for key, members in groups.items():
        if len(members) < 2:
            continue  # nothing to share
        # the shared run fills a replay buffer when a member replays from one (the stream
        # source needs nothing from phase 0); members without a buffer drop it when forked
        # (any ratio fills it alike: there is nothing earlier to replay in phase 0)
        ratio = 0.5 if any(_uses_buffer(r.cfg) for r in members) else 0.0
        for r in members:
            r.shared = 1  # the strategies differ at the latest from the first old model on
            r.shared_dir = out / "shared" / f"{key[:10]}-seed{r.seed}"
            r.shared_replay = ratio
    return runs


def _uses_buffer(cfg: Config) -> bool:
    from modx.strategies import replay_ratio

    return replay_ratio(cfg.strategy) > 0 and cfg.strategy.replay.source == "buffer"


def _aligns_initial(cfg: Config) -> bool:
    """strategy.align_initial resolved without building the model (see loop._align_initial)."""
    setting = cfg.strategy.align_initial
    if setting != "auto":
        return bool(setting)
    if cfg.model.pretrained is not None:
        return True
    from modx.models.factory import resolve_spec

    try:
        return resolve_spec(cfg.model.arch)["weights"] is not None
    except Exception:  # an invalid arch is reported by the run itself
        return False


# Strategy keys that act only once there is an old model (after the shared phases).
_LATER_PHASE_KEYS = ("name", "alpha", "temperature", "cognition_align", "reduction", "wiseft_alpha",
                     "align_initial", "ewc_lambda", "kl_diagonal", "kl_on", "teacher_cache")
_ZSCL_KEYS = ("reference", "zscl_batch", "zscl_temperature", "zscl_image_weight", "zscl_text_weight",
              "zscl_l2", "zscl_we_every")  # act from phase 1 on when zscl starts from scratch


def _prefix_key(cfg: Config) -> str:
    """Runs with equal keys train their shared phases identically: the whole config except
    the strategy keys that act later (the replay ratio among them) and the output directory."""
    tree = to_dict(cfg)
    defaults = to_dict(StrategyConfig())
    for key in _ZSCL_KEYS:  # at their defaults, as every other strategy has them (the keys stay stable)
        tree["strategy"][key] = defaults[key]
    for key in _LATER_PHASE_KEYS:
        tree["strategy"].pop(key, None)
    for key in ("ratio", "source", "schedule"):  # the buffer's size and max_mb shape phase 0's buffer
        tree["strategy"]["replay"].pop(key)
    tree["train"].pop("output_dir")
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def shared_config(r: BenchRun) -> Config:
    """The config of `r`'s shared run: plain fine-tuning, the strategy keys that act only
    later at their defaults (so every member plans the same config), and a replay buffer
    when a member goes on from one (phase 0 trains the same with or without it)."""
    cfg = copy.deepcopy(r.cfg)
    defaults = StrategyConfig()
    for key in (*_LATER_PHASE_KEYS, *_ZSCL_KEYS):
        setattr(cfg.strategy, key, getattr(defaults, key))
    cfg.strategy.name = "finetune"
    cfg.strategy.replay.ratio = r.shared_replay
    cfg.strategy.replay.source = "buffer"
    cfg.strategy.replay.schedule = defaults.replay.schedule
    cfg.train.output_dir = str(r.shared_dir)
    return cfg


# ----------------------------------------------------------------------------- stale directories


def config_record(cfg: Config) -> dict[str, Any]:
    """bench_config.json: the resolved config without train.output_dir, and the sha1 of it
    as sorted JSON."""
    tree = to_dict(cfg)
    tree["train"].pop("output_dir")
    text = json.dumps(tree, sort_keys=True, default=str)
    return {"hash": hashlib.sha1(text.encode()).hexdigest(), "config": json.loads(text)}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config trees (list items by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(old.keys() | new.keys())
                for k in changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in changed_keys(a, b, f"{prefix}.{i}")]
    return [] if old == new else [prefix]


def stale_reason(directory: Path, cfg: Config, shared_hash: str | None = None) -> str | None:
    """Why `directory` holds the training of another config than `cfg` (None: it does not).
    `shared_hash`: the planned shared run's hash, which a fork of another one misses."""
    record = _read_json(directory / RECORD)
    if not record:
        return f"has results but no {RECORD} (an older modx-bench)" if _has_results(directory) else None
    planned = config_record(cfg)
    if record.get("hash") != planned["hash"]:
        keys = changed_keys(record.get("config"), planned["config"])
        more = f", +{len(keys) - 5} more" if len(keys) > 5 else ""
        listed = f" ({', '.join(keys[:5])}{more})" if keys else ""
        return f"was trained with another config{listed}"
    fork = record.get("forked_from")
    if shared_hash is not None and fork is not None and fork.get("hash") != shared_hash:
        return f"was forked from shared/{fork.get('dir')} when that was trained with another config"
    return None


def drop_stale(runs: list[BenchRun], out: Path, reuse: bool = False) -> None:
    """Remove (to retrain) every shared and run directory trained with another config than
    planned, and every fork of a removed shared directory; with `reuse` keep them, saying so."""
    shared = {r.shared_dir: shared_config(r) for r in runs if r.shared_dir is not None}
    planned = [(d, cfg, None) for d, cfg in shared.items()]
    planned += [(r.run_dir, r.cfg, config_record(shared[r.shared_dir])["hash"] if r.shared_dir else None)
                for r in runs]
    for directory, cfg, shared_hash in planned:
        reason = stale_reason(directory, cfg, shared_hash)
        if reason is None:
            continue
        name = directory.relative_to(out)
        if reuse:
            print(f"modx-bench: {name} {reason}: reused as it is (--reuse)", flush=True)
        else:
            print(f"modx-bench: {name} {reason}: retraining it", flush=True)
            shutil.rmtree(directory)


def _start_record(directory: Path, cfg: Config, forked_from: Path | None = None) -> None:
    """Write the config `directory` starts training with, unless it holds a training already
    (recorded, or kept by --reuse); a fork also records the shared run it copies."""
    if forked_from is None and ((directory / RECORD).is_file() or _has_results(directory)):
        return
    record = config_record(cfg)
    if forked_from is not None:
        record["forked_from"] = {"dir": forked_from.name, "hash": _read_json(forked_from / RECORD).get("hash")}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _has_results(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("checkpoints", "summary.json", COST))


# ----------------------------------------------------------------------------- running


def run_bench(config: str | None, specs: Sequence[str], seeds: Sequence[int], out: str | Path,
              overrides: Sequence[str] = (), reuse: bool = False) -> dict[str, Any]:
    """Plan, retrain what another config trained (unless `reuse`), train what is missing
    (shared phases once), collect; returns bench.json's dict."""
    out = Path(out)
    runs = plan(config, specs, seeds, out, overrides)
    out.mkdir(parents=True, exist_ok=True)
    drop_stale(runs, out, reuse)
    for i, r in enumerate(runs, 1):
        print(f"modx-bench [{i}/{len(runs)}] {r.label} seed {r.seed} -> {r.run_dir}", flush=True)
        if r.shared_dir is not None and not (r.run_dir / "checkpoints").is_dir():
            _train_shared(r)  # once per shared directory: later members find it done
            _fork(r.shared_dir, r.run_dir, keep_buffer=_uses_buffer(r.cfg))
            _start_record(r.run_dir, r.cfg, forked_from=r.shared_dir)
            save_config(r.cfg, r.run_dir / "config.yaml")
        if not (r.run_dir / "summary.json").is_file() or not (r.run_dir / COST).is_file():
            _start_record(r.run_dir, r.cfg)
            _train(r.cfg, resume="latest", until_phase=None)
            _write_cost(r.run_dir)
        r.cost = _combine_costs(r)
        result = collect(runs[:i])  # rewritten after every run, in case the bench is stopped
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=_plain) + "\n")
    md, page = write_bench_report(result, runs, out)
    print(format_table(result))
    print(f"wrote {out / 'bench.json'}, {md} and {page}")
    return result


def _train_shared(r: BenchRun) -> None:
    """Train the shared leading phase(s) once as plain fine-tuning (resumable)."""
    if (r.shared_dir / COST).is_file():
        return
    print(f"modx-bench: training the shared phase {r.cfg.stream.phases[0].name!r} once in {r.shared_dir}",
          flush=True)
    cfg = shared_config(r)
    _start_record(r.shared_dir, cfg)
    _train(cfg, resume="latest", until_phase=r.shared - 1)
    _write_cost(r.shared_dir)


def _fork(shared_dir: Path, run_dir: Path, keep_buffer: bool = True) -> None:
    """Start `run_dir` as a copy of the shared run (atomically: a copy, then a rename);
    without `keep_buffer` the shared run's replay buffer is left out (not charged). The
    bench's records stay behind: the shared run's attempts are charged from its directory."""
    from modx.data.replay import STATE_JSON, STATE_TAR

    tmp = run_dir.with_name(f".tmp-{run_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    skip = ["logs", "report*", RECORD, ATTEMPTS, HEARTBEAT, COST] + ([] if keep_buffer else [STATE_TAR, STATE_JSON])
    shutil.copytree(shared_dir, tmp, ignore=shutil.ignore_patterns(*skip))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.replace(tmp, run_dir)


# ----------------------------------------------------------------------------- attempts and cost


def _train(cfg: Config, resume: str | None, until_phase: int | None) -> dict[str, Any]:
    """modx.train.run in a child process (its wall time and peak memory its own), recorded
    as one line of the run directory's bench_attempts.jsonl whether it finishes or not;
    returns that line."""
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fold_heartbeat(run_dir)  # the attempt a killed bench left unrecorded
    started, start = time.time(), time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=_child, args=(cfg, resume, until_phase, started))
    child.start()
    child.join()
    beat = _read_json(run_dir / HEARTBEAT)
    attempt = {**_attempt(beat), "start": started, "wall_s": time.perf_counter() - start,
               "finished": child.exitcode == 0}
    _append_attempt(run_dir, attempt)
    (run_dir / HEARTBEAT).unlink(missing_ok=True)
    if child.exitcode == PREEMPTED_EXIT:
        raise BenchError(f"training {cfg.train.output_dir} was preempted (a signal) and saved its state: "
                         "run modx-bench again to resume it")
    if child.exitcode != 0:
        raise BenchError(f"training {cfg.train.output_dir} failed (exit status {child.exitcode}); "
                         "its output is above. Run modx-bench again to resume it.")
    return attempt


def _child(cfg: Config, resume: str | None, until_phase: int | None, started: float) -> None:
    """modx.train.run with a heartbeat (bench_attempt.json) every HEARTBEAT_S and at the end."""
    import torch  # noqa: F401 - imported here, not first in the heartbeat's thread

    from modx.train import run

    path = Path(cfg.train.output_dir) / HEARTBEAT
    stop = threading.Event()
    beating = threading.Thread(target=_beat_until, args=(path, started, stop), daemon=True)
    beating.start()
    finished = False
    try:
        run(cfg, resume=resume, until_phase=until_phase)
        finished = True
    except Preempted:  # the run saved a state and printed where; no traceback
        sys.exit(PREEMPTED_EXIT)
    finally:
        stop.set()
        beating.join()
        _beat(path, started, finished)


def _beat_until(path: Path, started: float, stop: threading.Event) -> None:
    """The heartbeat's thread: a beat now, then every HEARTBEAT_S until `stop` is set."""
    _beat(path, started, False)
    while not stop.wait(HEARTBEAT_S):
        _beat(path, started, False)


def _beat(path: Path, started: float, finished: bool) -> None:
    """Write the attempt so far: its start, elapsed seconds, peak memory of this process."""
    import torch

    beat = {"start": started, "elapsed_s": time.time() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "finished": finished}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        beat["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(beat))
    os.replace(tmp, path)


def fold_heartbeat(run_dir: Path) -> None:
    """Append the attempt whose heartbeat a killed bench left in `run_dir` to its attempts
    (once: an attempt already recorded under its start time is not added again)."""
    beat = _read_json(run_dir / HEARTBEAT)
    if beat and beat.get("start") not in {a.get("start") for a in read_attempts(run_dir)}:
        _append_attempt(run_dir, {**_attempt(beat), "start": beat.get("start"),
                                  "wall_s": beat.get("elapsed_s", 0.0), "finished": beat.get("finished", False)})
    (run_dir / HEARTBEAT).unlink(missing_ok=True)


def _attempt(beat: dict[str, Any]) -> dict[str, Any]:
    """The peak memory of a heartbeat (0 when the child died before its first one)."""
    return {"peak_rss_mb": beat.get("peak_rss_mb", 0.0),
            **({"peak_cuda_mb": beat["peak_cuda_mb"]} if "peak_cuda_mb" in beat else {})}


def _append_attempt(run_dir: Path, attempt: dict[str, Any]) -> None:
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps(attempt) + "\n")


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of `run_dir`'s bench_attempts.jsonl (none when it has no such file)."""
    path = run_dir / ATTEMPTS
    attempts = []
    for n, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        if not line.strip():
            continue
        try:
            attempts.append(json.loads(line))
        except json.JSONDecodeError:
            raise BenchError(f"{path} line {n} is not JSON (cut short by a kill?): delete that line "
                             "and run modx-bench again") from None
    return attempts


def directory_cost(run_dir: Path) -> dict[str, Any]:
    """A directory's own cost over its attempts: wall seconds summed, peak memory the max.
    A directory of an older modx-bench (no attempts file) has its last attempt's cost in
    bench_cost.json."""
    attempts = read_attempts(run_dir)
    if not attempts:
        old = _read_json(run_dir / COST)
        return {"wall_s": old.get("wall_s", 0.0), "peak_rss_mb": old.get("peak_rss_mb", 0.0),
                "attempts": old.get("attempts", 1 if old else 0),
                **({"peak_cuda_mb": old["peak_cuda_mb"]} if "peak_cuda_mb" in old else {})}
    cuda = [a["peak_cuda_mb"] for a in attempts if "peak_cuda_mb" in a]
    return {"wall_s": sum(a.get("wall_s", 0.0) for a in attempts),
            "peak_rss_mb": max(a.get("peak_rss_mb", 0.0) for a in attempts),
            "attempts": len(attempts), **({"peak_cuda_mb": max(cuda)} if cuda else {})}


def _write_cost(run_dir: Path) -> None:
    """Mark `run_dir`'s training finished, with its own cost."""
    (run_dir / COST).write_text(json.dumps(directory_cost(run_dir), indent=1) + "\n")


def _buffer_cost(shared_dir: Path) -> dict[str, float]:
    """What the shared run's replay buffer cost it (seconds adding to it, its peak MB), from
    its latest state's trainer_state.json (modx.train.replay.ReplayFeed.cost)."""
    from modx.train.checkpoint import find_latest, read_trainer_state

    latest = find_latest(shared_dir / "checkpoints")
    state = read_trainer_state(latest) if latest is not None else {}
    return {k: float(state.get(k, 0.0)) for k in ("replay_seconds", "replay_mb")}


def _combine_costs(r: BenchRun) -> dict[str, Any]:
    """The cost of the run as if trained alone: its shared phases + its own, every attempt
    (restarts included). Samples/s is the trainer's (training steps only, summary.json's
    "cost"); wall time includes evaluation and process start."""
    own = directory_cost(r.run_dir)
    shared = directory_cost(r.shared_dir) if r.shared_dir is not None else {}
    if shared and not _uses_buffer(r.cfg):  # the shared run's replay buffer is not this run's cost
        buffer = _buffer_cost(r.shared_dir)
        shared["wall_s"] = shared["wall_s"] - buffer.get("replay_seconds", 0.0)
        shared["peak_rss_mb"] = shared["peak_rss_mb"] - buffer.get("replay_mb", 0.0)
    trained = _read_json(r.run_dir / "summary.json").get("cost", {})
    flops, estimated = train_flops(r.cfg, trained)
    cuda = [c["peak_cuda_mb"] for c in (own, shared) if "peak_cuda_mb" in c]
    return {
        "wall_s": own["wall_s"] + shared.get("wall_s", 0.0),
        "wall_s_shared": shared.get("wall_s", 0.0),
        "attempts": own["attempts"] + shared.get("attempts", 0),
        "train_seconds": trained.get("train_seconds"),
        "samples": trained.get("train_samples"),
        "samples_per_s": trained.get("samples_per_s"),
        "peak_rss_mb": max(own["peak_rss_mb"], shared.get("peak_rss_mb", 0.0)),
        **({"peak_cuda_mb": max(cuda)} if cuda else {}),
        "train_tflops": None if flops is None else flops / 1e12,
        "train_tflops_estimated": estimated,
    }


def _phase_steps(cfg: Config, i: int) -> int:
    p = cfg.stream.phases[i]
    return p.steps if p.steps is not None else math.ceil(p.samples / (cfg.train.batch_size * cfg.train.grad_accum))


_FLOPS_CACHE: dict[str, float | None] = {}


def train_flops(cfg: Config, trained: dict[str, Any]) -> tuple[float | None, bool]:
    """Training FLOPs of the forwards run, and whether they are estimated. From summary.json's
    "cost" (`trained`, global counts): forward FLOPs per sample x (3 x (train_samples +
    extra_train_samples) + old_model_samples): forward + backward ~ 3 forwards, the frozen
    old model a forward. A run without old_model_samples (an older modx) is estimated from
    the config. Forward FLOPs by torch.utils.flop_counter (matmuls and convolutions; the
    SSMs' FFTs are not counted)."""
    key = json.dumps([cfg.model.arch, cfg.model.pretrained])
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _forward_flops_per_sample(cfg)
    per_sample = _FLOPS_CACHE[key]
    if per_sample is None:
        return None, False
    if "old_model_samples" in trained and "train_samples" in trained:
        trained_samples = trained["train_samples"] + trained.get("extra_train_samples", 0)
        return per_sample * (3 * trained_samples + trained["old_model_samples"]), False
    return per_sample * _estimated_forwards(cfg), True


def _estimated_forwards(cfg: Config) -> float:
    """Forwards per run from the config: 3 per trained sample, plus a whole batch through
    the old model every step of strategies whose loss runs it (phases after the first, or
    all with align_initial)."""
    from modx.strategies import STRATEGIES

    old_phases = 0
    if STRATEGIES[cfg.strategy.name].uses_old_model:
        first = 0 if _aligns_initial(cfg) else 1
        old_phases = sum(_phase_steps(cfg, i) for i in range(first, len(cfg.stream.phases)))
    steps = sum(_phase_steps(cfg, i) for i in range(len(cfg.stream.phases)))
    return cfg.train.batch_size * cfg.train.grad_accum * (3 * steps + old_phases)


def _forward_flops_per_sample(cfg: Config) -> float | None:
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from modx.models import create_model

        model, _, _, tokenizer = create_model(cfg.model.arch, pretrained=cfg.model.pretrained,
                                             trust_torchscript=cfg.model.trust_torchscript)
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        image = torch.zeros(2, 3, *size)
        text = tokenizer(["a photo", "a photo"])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image, text)
        return counter.get_total_flops() / 2
    except Exception:  # noqa: BLE001 - a cost estimate must never stop the bench
        return None


# ----------------------------------------------------------------------------- results


def collect(runs: list[BenchRun]) -> dict[str, Any]:
    """bench.json: every run's summary and cost, and the mean / std over seeds per strategy."""
    rows = []
    for r in runs:
        summary = _read_json(r.run_dir / "summary.json")
        rows.append({"strategy": r.label, "seed": r.seed, "run_dir": str(r.run_dir),
                     "shared_phases": r.shared, "summary": summary, "cost": r.cost,
                     "metrics": headline(summary)})
    table = {}
    for label in dict.fromkeys(r.label for r in runs):
        mine = [row for row in rows if row["strategy"] == label]
        table[label] = {"seeds": [row["seed"] for row in mine]}
        for key, _ in SUMMARY_COLUMNS + OPTIONAL_COLUMNS:
            table[label][key] = _mean_std([row["metrics"].get(key) for row in mine])
        for key, _ in COST_COLUMNS:
            table[label][key] = _mean_std([row["cost"].get(key) for row in mine])
        if label != BASELINE and BASELINE in table:
            table[label]["difference"] = paired_difference(rows, label, BASELINE, "average_recall")
    omitted = sorted({row["summary"]["zeroshot"]["omitted"] for row in rows
                      if (row["summary"].get("zeroshot") or {}).get("omitted")})
    return {"runs": rows, "table": table, **({"zeroshot_omitted": omitted} if omitted else {})}


def paired_difference(rows: list[dict[str, Any]], label: str, baseline: str, key: str,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """`label`'s `key` minus `baseline`'s on the seeds both ran (paired by seed): the mean
    difference d and its Student-t interval d -+ t(1 - (1 - confidence) / 2, n - 1) s / sqrt(n),
    s the differences' sample std (no interval from one seed)."""
    from scipy.stats import t as student_t

    def by_seed(name: str) -> dict[int, float]:
        out = {}
        for row in rows:
            value = row["metrics"].get(key) if row["strategy"] == name else None
            if value is not None and math.isfinite(float(value)):
                out[row["seed"]] = float(value)
        return out

    mine, base = by_seed(label), by_seed(baseline)
    seeds = sorted(set(mine) & set(base))
    diffs = [mine[s] - base[s] for s in seeds]
    stat = _mean_std(diffs)
    low = high = None
    if stat["n"] > 1:
        half = float(student_t.ppf(1 - (1 - confidence) / 2, stat["n"] - 1)) * stat["std"] / math.sqrt(stat["n"])
        low, high = stat["mean"] - half, stat["mean"] + half
    return {"key": key, "baseline": baseline, "confidence": confidence, "seeds": seeds,
            "mean": stat["mean"], "low": low, "high": high, "n": stat["n"]}


def _difference_cell(stats: dict[str, Any]) -> str:
    """'+12.34 [8.10, 16.58]' (the paired mean difference and its interval), '-' without one."""
    d = stats.get("difference")
    if not d or d["mean"] is None:
        return "-"
    text = f"{d['mean']:+.2f}"
    return text + (f" [{d['low']:+.2f}, {d['high']:+.2f}]" if d["low"] is not None else "")


def _difference_title(result: dict[str, Any]) -> str | None:
    """The difference column's title, None when no strategy has one."""
    if not any(s.get("difference") for s in result["table"].values()):
        return None
    return f"average - {BASELINE} ({CONFIDENCE:.0%} CI)"


def summary_columns(result: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The continual columns of the table: SUMMARY_COLUMNS, and each of OPTIONAL_COLUMNS
    that some run has (retention also where it is omitted, to say so)."""
    def shown(key: str) -> bool:
        if key == "zeroshot_retention" and result.get("zeroshot_omitted"):
            return True
        return any(s[key]["n"] for s in result["table"].values())

    return SUMMARY_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if shown(c[0]))


def _mean_std(values: list[Any]) -> dict[str, Any]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(xs)}


def _cell(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _cost_cell(stats: dict[str, Any], key: str) -> str:
    return _cell(stats[key], 4 if key == "train_tflops" else 1)


def format_table(result: dict[str, Any]) -> str:
    """The per-strategy table as plain text (mean ± std over seeds)."""
    columns = summary_columns(result)
    diff = _difference_title(result)
    head = ["strategy"] + [t for _, t in columns] + ([diff] if diff else []) + [t for _, t in COST_COLUMNS]
    rows = [[label] + [_cell(s[k]) for k, _ in columns] + ([_difference_cell(s)] if diff else [])
            + [_cost_cell(s, k) for k, _ in COST_COLUMNS] for label, s in result["table"].items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).rjust(w) if j else str(x).ljust(w) for j, (x, w) in enumerate(zip(row, widths)))
             for row in [head, *rows]]
    lines += [f"zero-shot retention omitted: {reason}" for reason in result.get("zeroshot_omitted", [])]
    return "\n".join(lines)


def write_bench_report(result: dict[str, Any], runs: list[BenchRun], out: Path) -> tuple[Path, Path]:
    """OUT/report.{md,html}: the strategy table, plots, every run's recall matrix; and
    OUT/compare/: modx-report over the first seed's runs (disorder, rotation histograms)."""
    from modx.eval.report import render_report, write_report

    first_seed = runs[0].seed
    compare_dirs = [r.run_dir for r in runs if r.seed == first_seed]
    write_report(compare_dirs, out / "compare")
    blocks: list[tuple] = [("h1", "modx-bench: " + ", ".join(result["table"]))]
    blocks.append(("p", "Mean recall (R@1/5/10 both directions, %) per strategy; mean ± std over "
                        "seeds. average = mean over domains after the last phase; first domain, final = "
                        "recall on the first domain after the last phase; plasticity = mean recall on "
                        "each domain right after its own phase; forgetting, BWT, FWT as in GEM / "
                        "Chaudhry et al. Cost: wall time of the run as if trained alone (shared phases, "
                        "evaluation and every restarted attempt included), training samples per "
                        "second, peak resident memory of the training processes, training FLOPs "
                        "of the forwards run (estimated from the config for runs without "
                        "old-model counts: train_tflops_estimated in bench.json)."))
    columns = summary_columns(result)
    diff = _difference_title(result)
    head = ["strategy", "seeds"] + [t for _, t in columns] + ([diff] if diff else []) + [t for _, t in COST_COLUMNS]
    rows = [[label, str(len(s["seeds"]))] + [_cell(s[k]) for k, _ in columns] + ([_difference_cell(s)] if diff else [])
            + [_cost_cell(s, k) for k, _ in COST_COLUMNS] for label, s in result["table"].items()]
    blocks += [("h2", "Strategies"), ("table", head, rows)]
    if diff:
        blocks.append(("p", f"{diff}: the strategy's average minus {BASELINE}'s on the same seed, mean over "
                            f"the seeds both ran, with its Student-t interval (none from one seed)."))
    if len(columns) > len(SUMMARY_COLUMNS):
        blocks.append(("p", "val average = mean recall on the phases' validation sets after the last phase "
                            "(what modx-bench --select ranks by); zero-shot retention = top-1 zero-shot "
                            "accuracy after the last phase as % of the reference model's (eval.retention_from), "
                            "mean over the zero-shot sets."))
    blocks += [("p", f"Zero-shot retention omitted: {reason}.") for reason in result.get("zeroshot_omitted", [])]
    figures = _bench_figures(result)
    captions = {
        "bench_first_domain.png": "Recall on the first domain after each phase (mean over seeds).",
        "bench_tradeoff.png": "Stability vs plasticity: first domain's final recall against the "
                              "mean recall on each domain right after its phase.",
    }
    blocks.append(("h2", "Plots"))
    blocks += [("img", name, captions[name]) for name, _ in figures]
    blocks.append(("p", "Spatial disorder and per-run details of the first seed: `compare/report.html`."))
    for row in result["runs"]:
        s = row["summary"]
        sets = s.get("eval_sets", [])
        table = [["initial"] + [_fmt(x) for x in s["initial"]]] if s.get("initial") else []
        table += [[p] + [_fmt(x) for x in vals] for p, vals in zip(s.get("phases", []), s.get("matrix", []))]
        blocks.append(("h3", f"{row['strategy']} (seed {row['seed']}): recall matrix"))
        blocks.append(("table", ["after phase"] + sets, table))
    return render_report(blocks, figures, out)


def _bench_figures(result: dict[str, Any]) -> list[tuple[str, bytes]]:
    from modx.eval.report import figure_png, new_figure

    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in result["runs"]:
        by_label.setdefault(row["strategy"], []).append(row)
    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    phases: list[str] = []
    for label, rows in by_label.items():
        curves = [[r[0] for r in row["summary"]["matrix"]] for row in rows if row["summary"].get("matrix")]
        if not curves:
            continue
        phases = rows[0]["summary"]["phases"]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
        ax.plot(range(len(mean)), mean, marker="o", label=label)
    ax.set_xticks(range(len(phases)), phases)
    ax.set_xlabel("after phase")
    ax.set_ylabel("first domain mean recall (%)")
    ax.legend(fontsize=8)
    first = figure_png(fig)
    fig = new_figure(5.5, 4.2)
    ax = fig.add_subplot()
    for label, stats in result["table"].items():
        x, y = stats["plasticity"]["mean"], stats["first_last"]["mean"]
        if x is not None and y is not None:
            ax.errorbar(x, y, xerr=stats["plasticity"]["std"] or 0, yerr=stats["first_last"]["std"] or 0,
                        marker="o", capsize=3, label=label)
    ax.set_xlabel("plasticity: recall on each domain after its phase (%)")
    ax.set_ylabel("first domain, final recall (%)")
    ax.legend(fontsize=8)
    return [("bench_first_domain.png", first), ("bench_tradeoff.png", figure_png(fig))]


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else str(v)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modx-bench",
        description="Continual strategies side by side on one stream from one start "
                    "(shared phases trained once); writes OUT/bench.json and OUT/report.html.",
    )
    parser.add_argument("--config", help="the stream's YAML config (default: configs/demo.yaml's defaults)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--strategies", nargs="+", metavar="NAME[:key=value,...]")
    which.add_argument("--select", nargs="+", metavar="NAME:key=v1,v2,...;key=v1,...",
                       help="train every point of the grid(s), choose the best on the val sets only, "
                            "report its test numbers (OUT/select.json; docs/strategies.md)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--reuse", action="store_true",
                        help="keep run directories trained with another config than planned "
                             "(default: retrain them)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    specs, overrides = split_arguments(args.strategies or args.select, args.overrides)
    try:
        if args.select:
            from modx.train.select import run_select

            run_select(args.config, specs, args.seeds, args.out, overrides, args.reuse)
        else:
            run_bench(args.config, specs, args.seeds, args.out, overrides, args.reuse)
    except (BenchError, ConfigError) as err:
        print(f"modx-bench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

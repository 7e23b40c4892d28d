"""modx-bench: strategy specs, the plan (which phases are shared), stale directories, the
cost of every attempt, FLOPs from the forwards run, and a small bench end to end: shared
phase trained once, forks equal standalone runs, a killed bench continues, a run trained
with another config is retrained."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modx.train import bench
from modx.train.bench import (
    BenchError,
    config_record,
    drop_stale,
    main,
    plan,
    split_arguments,
    strategy_overrides,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_helpers import micro_model  # noqa: E402


def test_strategy_specs_become_overrides():
    assert strategy_overrides("finetune") == ["strategy.name=finetune"]
    assert strategy_overrides("modx:alpha=5,replay.ratio=0.2,train.lr=1e-3") == [
        "strategy.name=modx", "strategy.alpha=5", "strategy.replay.ratio=0.2", "train.lr=1e-3"]
    assert strategy_overrides("modx:stream.phases.0.steps=4") == ["strategy.name=modx", "stream.phases.0.steps=4"]
    with pytest.raises(BenchError, match="key=value"):
        strategy_overrides("modx:alpha")


def test_trailing_overrides_are_told_apart_from_strategy_specs():
    specs, extra = split_arguments(["finetune", "modx:alpha=5", "train.lr=1e-3"], ["eval.probe=10"])
    assert specs == ["finetune", "modx:alpha=5"]
    assert extra == ["eval.probe=10", "train.lr=1e-3"]


def _config(tmp_path: Path, data_root: Path | None = None) -> str:
    root = data_root or tmp_path / "data"
    path = tmp_path / "bench.yaml"
    path.write_text(
        f"model: {{arch: {micro_model(tmp_path)}}}\n"
        f"stream:\n  data_root: {root}\n  phases:\n"
        "    - {name: a, builtin: digits, steps: 2}\n    - {name: b, builtin: digits, steps: 2}\n"
        "train: {batch_size: 8, workers: 0, shuffle: 16, tracker: none, progress: false, ckpt_every: 100}\n"
        "eval: {probe: 20, backend: torch, report: false}\n"
    )
    return str(path)


def test_plan_shares_the_first_phase_only_among_strategies_that_train_it_plainly(tmp_path):
    zscl = f"zscl:reference={tmp_path / 'ref.tar'},zscl_l2=0.5"  # from scratch: its phase 0 is plain
    specs = ["finetune", "modx", "modx:alpha=5", "wiseft", "ewc", "replay", "modx:replay.ratio=0.2",
             "modx:train.lr=1e-3", zscl, "ctp"]
    runs = plan(_config(tmp_path), specs, [0, 1], tmp_path / "out")
    shared = {r.label for r in runs if r.shared}
    assert shared == {"finetune", "modx", "modx:alpha=5", "wiseft", "replay", "modx:replay.ratio=0.2", zscl}
    assert {r.shared_replay for r in runs if r.shared} == {0.5}  # the shared run keeps a buffer
    records = {bench.config_record(bench.shared_config(r))["hash"] for r in runs if r.shared and r.seed == 0}
    assert len(records) == 1  # every member plans the same shared run (a zscl member changes nothing)
    by_seed = {seed: {r.shared_dir for r in runs if r.shared and r.seed == seed} for seed in (0, 1)}
    assert len(by_seed[0]) == len(by_seed[1]) == 1 and by_seed[0] != by_seed[1]  # one per seed
    aligned = plan(_config(tmp_path), ["finetune", "modx", zscl], [0], tmp_path / "out",
                   ["strategy.align_initial=true"])
    assert [r.shared for r in aligned] == [0, 0, 0]  # an old / initial model from phase 0 on: nothing shared
    streaming = plan(_config(tmp_path), ["finetune", "modx:replay.source=stream"], [0], tmp_path / "out")
    assert [r.shared_replay for r in streaming] == [0.0, 0.0]  # no member needs phase 0's buffer
    data = f"replay.source=stream,replay.data={tmp_path / 'nothing.tar'}"
    own = plan(_config(tmp_path), [f"replay:{data}", f"modx:{data}"], [0], tmp_path / "out")
    assert [r.shared for r in own] == [0, 0]  # replays the user's shards from phase 0 on: nothing shared


def test_bad_requests_exit_2_with_one_line(tmp_path, capsys):
    assert main(["--config", _config(tmp_path), "--strategies", "nonsense", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy 'nonsense'" in err[0] and "strategy.name" in err[0]
    assert main(["--config", _config(tmp_path), "--strategies", "modx:alpah=5", "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'strategy.alpha'" in capsys.readouterr().err


def _fake_training(directory: Path, cfg, forked_from: Path | None = None) -> None:
    """A directory as a finished training of `cfg` leaves it (without training)."""
    bench._start_record(directory, cfg, forked_from)
    (directory / "summary.json").write_text("{}")
    (directory / "bench_cost.json").write_text("{}")


def test_stale_directories_are_retrained_with_every_fork_of_a_stale_shared_one(tmp_path, capsys):
    out = tmp_path / "out"
    runs = plan(_config(tmp_path), ["finetune", "modx", "ewc"], [0], out)
    finetune, modx, ewc = runs
    shared = bench.shared_config(modx)
    assert config_record(shared) == config_record(bench.shared_config(finetune))  # one per directory
    before = bench.shared_config(modx)
    before.stream.phases[0].steps = 3  # the shared phase was trained longer
    _fake_training(modx.shared_dir, before)
    _fake_training(finetune.run_dir, finetune.cfg, forked_from=finetune.shared_dir)
    _fake_training(modx.run_dir, modx.cfg, forked_from=modx.shared_dir)
    _fake_training(ewc.run_dir, ewc.cfg)  # not shared: not stale
    drop_stale(runs, out, reuse=True)
    said = capsys.readouterr().out.splitlines()
    assert all(d.is_dir() for d in (modx.shared_dir, finetune.run_dir, modx.run_dir, ewc.run_dir))
    assert len(said) == 3 and all(line.endswith("reused as it is (--reuse)") for line in said)
    drop_stale(runs, out)
    said = capsys.readouterr().out.splitlines()
    assert not modx.shared_dir.exists() and not finetune.run_dir.exists() and not modx.run_dir.exists()
    assert ewc.run_dir.is_dir()
    assert said[0] == (f"modx-bench: shared/{modx.shared_dir.name} was trained with another config "
                       "(stream.phases.0.steps): retraining it")
    assert said[2] == (f"modx-bench: runs/modx-seed0 was forked from shared/{modx.shared_dir.name} when that "
                       "was trained with another config: retraining it")


def test_a_directory_with_results_but_no_record_is_stale(tmp_path, capsys):
    out = tmp_path / "out"
    runs = plan(_config(tmp_path), ["ewc"], [0], out)
    runs[0].run_dir.mkdir(parents=True)
    drop_stale(runs, out)  # an empty directory: nothing to retrain
    assert runs[0].run_dir.is_dir() and not capsys.readouterr().out
    (runs[0].run_dir / "summary.json").write_text("{}")
    drop_stale(runs, out)
    assert not runs[0].run_dir.exists()
    assert "runs/ewc-seed0 has results but no bench_config.json" in capsys.readouterr().out


def test_changed_keys_are_dotted_and_the_message_names_at_most_five(tmp_path):
    old = {"strategy": {"alpha": 1, "replay": {"ratio": 0.25}}, "stream": {"phases": [{"steps": 2}]}}
    new = {"strategy": {"alpha": 2, "replay": {"ratio": 0.5}}, "stream": {"phases": [{"steps": 3}]}}
    assert bench.changed_keys(old, new) == ["strategy.alpha", "strategy.replay.ratio", "stream.phases.0.steps"]
    assert bench.changed_keys(old, {**new, "stream": {"phases": []}})[-1] == "stream.phases"
    runs = plan(_config(tmp_path), ["ewc"], [0], tmp_path / "out")
    cfg = runs[0].cfg
    other = bench.copy.deepcopy(cfg)
    other.train.lr, other.train.seed, other.train.warmup, other.train.weight_decay = 1.0, 7, 0.5, 0.0
    other.strategy.ewc_lambda, other.eval.probe = 1.0, 3
    bench._start_record(runs[0].run_dir, other)
    reason = bench.stale_reason(runs[0].run_dir, cfg)
    assert reason == ("was trained with another config (eval.probe, strategy.ewc_lambda, train.lr, "
                      "train.seed, train.warmup, +1 more)")


def test_an_unfinished_heartbeat_is_folded_into_the_attempts_once(tmp_path):
    beat = {"start": 100.0, "elapsed_s": 12.5, "peak_rss_mb": 900.0, "finished": False}
    bench._append_attempt(tmp_path, {"start": 50.0, "wall_s": 30.0, "peak_rss_mb": 500.0, "finished": False})
    (tmp_path / bench.HEARTBEAT).write_text(json.dumps(beat))
    bench.fold_heartbeat(tmp_path)
    assert not (tmp_path / bench.HEARTBEAT).exists()
    (tmp_path / bench.HEARTBEAT).write_text(json.dumps(beat))  # as if killed before removing it
    bench.fold_heartbeat(tmp_path)
    assert bench.read_attempts(tmp_path)[1] == {"peak_rss_mb": 900.0, "start": 100.0, "wall_s": 12.5,
                                                "finished": False}
    assert bench.directory_cost(tmp_path) == {"wall_s": 42.5, "peak_rss_mb": 900.0, "attempts": 2}


def test_a_failed_child_is_recorded_as_an_attempt(tmp_path):
    cfg = plan(_config(tmp_path), ["ewc"], [0], tmp_path / "out")[0].cfg
    cfg.model.arch = "no-such-model"
    with pytest.raises(BenchError, match="Run modx-bench again to resume it"):
        bench._train(cfg, None, None)
    run_dir = Path(cfg.train.output_dir)
    [attempt] = bench.read_attempts(run_dir)
    assert attempt["finished"] is False and attempt["wall_s"] > 0
    assert attempt["peak_rss_mb"] > 0  # from the child's last heartbeat
    assert not (run_dir / bench.HEARTBEAT).exists()


def test_train_flops_count_the_forwards_summary_json_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_FLOPS_CACHE", {})
    monkeypatch.setattr(bench, "_forward_flops_per_sample", lambda cfg: 1e9)
    r = plan(_config(tmp_path), ["modx"], [0], tmp_path / "out")[0]  # 2 phases x 2 steps x 8 samples
    r.run_dir.mkdir(parents=True)
    counts = {"train_samples": 32, "old_model_samples": 4, "extra_train_samples": 8}
    (r.run_dir / "summary.json").write_text(json.dumps({"cost": counts}))
    cost = bench._combine_costs(r)
    assert cost["train_tflops"] == pytest.approx(1e9 * (3 * (32 + 8) + 4) / 1e12)
    assert cost["train_tflops_estimated"] is False
    (r.run_dir / "summary.json").write_text(json.dumps({"cost": {"train_samples": 32}}))  # an older run
    cost = bench._combine_costs(r)
    assert cost["train_tflops"] == pytest.approx(1e9 * 8 * (3 * 4 + 2) / 1e12)  # old forward in phase 1
    assert cost["train_tflops_estimated"] is True


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    assert main(["--config", _config(tmp), "--strategies", "finetune", "modx", "replay", "--out", str(out)]) == 0
    return tmp, out


def test_bench_writes_one_summary_per_run_and_a_report(bench_dir):
    _, out = bench_dir
    bench = json.loads((out / "bench.json").read_text())
    assert [(r["strategy"], r["seed"]) for r in bench["runs"]] == [("finetune", 0), ("modx", 0), ("replay", 0)]
    for r in bench["runs"]:
        summary = r["summary"]
        assert summary["eval_sets"] == ["a", "b"] and len(summary["matrix"]) == 2
        assert summary["strategy"] == r["strategy"]
        assert r["cost"]["wall_s"] > 0 and r["cost"]["samples"] == 4 * 8
        assert r["cost"]["attempts"] == 2 and r["cost"]["train_tflops_estimated"] is False
    tflops = {r["strategy"]: r["cost"]["train_tflops"] for r in bench["runs"]}
    assert tflops["finetune"] == tflops["replay"] < tflops["modx"]  # modx's old model on replayed rows
    assert set(bench["table"]) == {"finetune", "modx", "replay"}
    page = (out / "report.html").read_text()
    assert "modx-bench" in page and "data:image/png;base64" in page
    assert (out / "compare" / "report.html").is_file()


def _phase_rows(run_dir: Path, tmp: Path) -> list[float]:
    """mean_recall of every eval set for the model `run_dir` exported after phase 0,
    computed here from its weights and the eval shards."""
    from modx.config import load_config
    from modx.eval.embed import embed_dataset
    from modx.eval.load import load_model
    from modx.eval.retrieval import retrieval_metrics
    from modx.train.data import resolve_phases

    cfg = load_config(_config(tmp))
    model, preprocess, tokenizer, _ = load_model(run_dir / "checkpoints" / "phase-0")
    rows = []
    for phase in resolve_phases(cfg):
        emb = embed_dataset(model, phase.eval, preprocess=preprocess, tokenizer=tokenizer, progress=False)
        rows.append(retrieval_metrics(emb.image, emb.text, emb.text_image_ids, ks=tuple(cfg.eval.ks),
                                      backend="torch")["mean_recall"])
    return rows


def test_the_shared_phase_is_trained_once(bench_dir):
    tmp, out = bench_dir
    assert len(list((out / "shared").iterdir())) == 1
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert [r["shared_phases"] for r in runs] == [1, 1, 1]
    # every strategy went on from one model: each run's phase-a row is recomputed from the
    # phase-0 model in its own directory (not read from the results it inherited), and
    # those models are the shared run's
    [shared] = (out / "shared").iterdir()
    start = load_file(shared / "checkpoints" / "phase-0" / "model.safetensors")
    for r in runs:
        held = load_file(Path(r["run_dir"]) / "checkpoints" / "phase-0" / "model.safetensors")
        assert held.keys() == start.keys() and all(torch.equal(held[k], v) for k, v in start.items())
        # recomputed by another code path (batching, threads): a near tie may flip one rank
        assert r["summary"]["matrix"][0] == pytest.approx(_phase_rows(Path(r["run_dir"]), tmp), abs=0.1)
    # the buffer phase 0 filled goes on with the members that replay from it, and is charged to them only
    forks = {r["strategy"]: Path(r["run_dir"]) / "checkpoints" for r in runs}
    assert not list(forks["finetune"].glob("state-*/replay.tar"))
    assert list(forks["modx"].glob("state-*/replay.tar"))
    cost = {r["strategy"]: r["cost"] for r in runs}
    assert cost["finetune"]["wall_s_shared"] < cost["modx"]["wall_s_shared"] == cost["replay"]["wall_s_shared"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["modx", "replay"])
def test_forked_runs_end_where_standalone_runs_end(bench_dir, strategy):
    """The fork (weights, optimiser, RNG, replay buffer) loses nothing: a standalone run of
    the same config ends with the same weights."""
    from modx.config import load_config
    from modx.train.bench import _train

    tmp, out = bench_dir
    alone = tmp / f"alone-{strategy}"
    _train(load_config(_config(tmp), [f"strategy.name={strategy}", f"train.output_dir={alone}"]), None, None)
    forked = load_file(out / "runs" / f"{strategy}-seed0" / "checkpoints" / "phase-1" / "model.safetensors")
    for k, v in load_file(alone / "checkpoints" / "phase-1" / "model.safetensors").items():
        torch.testing.assert_close(forked[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for p in [*out.glob("runs/*/summary.json"), *out.glob("shared/*/bench_cost.json")]}


def test_a_killed_bench_continues_where_it_stopped_and_charges_every_attempt(bench_dir):
    tmp, out = bench_dir
    done = out / "runs" / "finetune-seed0" / "summary.json"
    stamp = done.stat().st_mtime_ns
    modx = out / "runs" / "modx-seed0"
    (modx / "summary.json").unlink()  # as if killed after its last phase ...
    (modx / "bench_cost.json").unlink()
    beat = {"start": time.time() - 1000, "elapsed_s": 1000.0, "peak_rss_mb": 1e6, "finished": False}
    (modx / "bench_attempt.json").write_text(json.dumps(beat))  # ... in a training attempt of 1000 s
    assert main(["--config", _config(tmp), "--strategies", "finetune", "modx", "replay", "--out", str(out)]) == 0
    assert done.stat().st_mtime_ns == stamp  # a finished run is not trained again
    assert (modx / "summary.json").is_file()
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert len(runs) == 3
    [shared] = (out / "shared").iterdir()
    attempts = bench.read_attempts(shared) + bench.read_attempts(modx)
    assert [a["finished"] for a in bench.read_attempts(modx)] == [True, False, True]
    cost = runs[1]["cost"]
    assert cost["attempts"] == 4 and cost["peak_rss_mb"] == 1e6
    assert cost["wall_s"] == pytest.approx(sum(a["wall_s"] for a in attempts)) and cost["wall_s"] > 1000
    assert runs[0]["cost"]["attempts"] == 2  # the shared phase and its own


def test_a_run_trained_with_another_config_is_retrained_unless_reuse(bench_dir, capsys):
    tmp, out = bench_dir
    args = ["--config", _config(tmp), "--strategies", "finetune", "modx", "replay", "--out", str(out)]
    record = out / "runs" / "modx-seed0" / "bench_config.json"
    cfg = plan(_config(tmp), ["modx"], [0], out)[0].cfg
    cfg.strategy.alpha = 3.0  # as if trained with strategy.alpha=3 in the config
    record.write_text(json.dumps({**json.loads(record.read_text()), **config_record(cfg)}))
    before = _mtimes(out)
    capsys.readouterr()
    assert main([*args, "--reuse"]) == 0
    assert _mtimes(out) == before
    assert ("modx-bench: runs/modx-seed0 was trained with another config (strategy.alpha): reused as it is "
            "(--reuse)") in capsys.readouterr().out
    assert main(args) == 0
    assert ("modx-bench: runs/modx-seed0 was trained with another config (strategy.alpha): retraining it"
            in capsys.readouterr().out)
    after = _mtimes(out)
    assert [k for k in before if after[k] != before[k]] == ["runs/modx-seed0/summary.json"]
    modx = json.loads((out / "bench.json").read_text())["runs"][1]
    assert modx["cost"]["attempts"] == 2  # a fresh fork: the shared phase's attempt and its own
    assert config_record(plan(_config(tmp), ["modx"], [0], out)[0].cfg)["hash"] == json.loads(record.read_text())["hash"]


@pytest.mark.slow
def test_a_changed_shared_phase_retrains_the_shared_run_and_its_members(bench_dir, capsys):
    tmp, out = bench_dir
    before = _mtimes(out)
    capsys.readouterr()
    assert main(["--config", _config(tmp), "--strategies", "finetune", "modx", "replay", "--out", str(out),
                 "stream.phases.0.steps=3"]) == 0
    said = capsys.readouterr().out
    for name in ("finetune", "modx", "replay"):
        assert (f"runs/{name}-seed0 was trained with another config (stream.phases.0.steps): retraining it"
                in said)
    after = _mtimes(out)
    assert all(after[k] != before[k] for k in before if k.startswith("runs/"))
    [new_shared] = [k for k in after if k not in before]  # a new shared run: the old one is not its start
    record = json.loads((out / Path(new_shared).parent / "bench_config.json").read_text())
    assert record["config"]["stream"]["phases"][0]["steps"] == 3
    assert record["config"]["strategy"]["name"] == "finetune"
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert all(r["cost"]["samples"] == 5 * 8 for r in runs)


def _rows(values: dict[str, dict[int, float]]) -> list[dict]:
    return [{"strategy": name, "seed": seed, "metrics": {"average_recall": v}}
            for name, by_seed in values.items() for seed, v in by_seed.items()]


def test_the_difference_to_finetune_is_paired_by_seed_with_a_student_t_interval():
    import math

    from modx.train.bench import paired_difference

    # seeds 0 1 2 of both and seed 3 of one only: three paired differences 5, 7, 12
    rows = _rows({"finetune": {0: 10.0, 1: 20.0, 2: 30.0}, "modx": {0: 15.0, 1: 27.0, 2: 42.0, 3: 99.0}})
    d = paired_difference(rows, "modx", "finetune", "average_recall")
    diffs = [5.0, 7.0, 12.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    p = 0.975  # Student's t with 2 degrees of freedom in closed form: t_p = (2p - 1) sqrt(2 / (4 p (1 - p)))
    t2 = (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3 and d["mean"] == pytest.approx(mean)
    assert d["low"] == pytest.approx(mean - t2 * sd / math.sqrt(3), rel=1e-9)
    assert d["high"] == pytest.approx(mean + t2 * sd / math.sqrt(3), rel=1e-9)
    # two seeds: Student's t with 1 degree of freedom is Cauchy, t_p = tan(pi (p - 1/2))
    d = paired_difference(_rows({"finetune": {0: 1.0, 1: 2.0}, "x": {0: 4.0, 1: 3.0}}), "x", "finetune", "average_recall")
    half = math.tan(math.pi * (p - 0.5)) * math.sqrt(2.0) / math.sqrt(2)  # diffs 3, 1: sd sqrt(2)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)
    # one seed: the difference without an interval
    d = paired_difference(_rows({"finetune": {0: 1.0}, "x": {0: 4.0}}), "x", "finetune", "average_recall")
    assert (d["mean"], d["low"], d["high"], d["n"]) == (3.0, None, None, 1)


def test_the_table_shows_the_difference_to_finetune_where_it_ran():
    from modx.train.bench import (
        COST_COLUMNS,
        OPTIONAL_COLUMNS,
        SUMMARY_COLUMNS,
        _mean_std,
        format_table,
        paired_difference,
    )

    rows = _rows({"finetune": {0: 10.0, 1: 20.0}, "modx": {0: 15.0, 1: 27.0}})
    for row in rows:
        row.update(summary={}, cost={})
    result = {"runs": rows, "table": {}}
    for label in ("finetune", "modx"):
        mine = [r for r in rows if r["strategy"] == label]
        result["table"][label] = {"seeds": [0, 1], **{k: _mean_std([r["metrics"].get(k) for r in mine])
                                                       for k, _ in SUMMARY_COLUMNS + OPTIONAL_COLUMNS + COST_COLUMNS}}
    result["table"]["modx"]["difference"] = paired_difference(rows, "modx", "finetune", "average_recall")
    text = format_table(result)
    assert "average - finetune (95% CI)" in text.splitlines()[0]
    modx_line = next(line for line in text.splitlines() if line.startswith("modx"))
    assert "+6.00 [" in modx_line  # diffs 5 and 7
    del result["table"]["modx"]["difference"]
    assert "finetune (95% CI)" not in format_table(result)


def test_a_preempted_training_child_exits_without_a_traceback(tmp_path, monkeypatch, capsys):
    """A preemption signal stops the run with its state saved (modx.train.preempt): the
    bench's training child exits with PREEMPTED_EXIT, no traceback (the bench then stops
    with one line saying to run it again)."""
    import modx.train as train
    from modx.config import load_config
    from modx.train.preempt import Preempted

    def preempted(*args, **kwargs):
        raise Preempted("preempted at step 3")

    monkeypatch.setattr(train, "run", preempted)
    cfg = load_config(_config(tmp_path), [f"train.output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as stopped:
        bench._child(cfg, None, None, 0.0)
    assert stopped.value.code == bench.PREEMPTED_EXIT
    assert "Traceback" not in capsys.readouterr().err

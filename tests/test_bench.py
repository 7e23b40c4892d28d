"""modx-bench: strategy specs, the plan (which phases are shared), and a small bench end to
end: shared phase trained once, forks equal standalone runs, a killed bench continues."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modx.train.bench import BenchError, main, plan, split_arguments, strategy_overrides

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
    specs = ["finetune", "modx", "modx:alpha=5", "wiseft", "ewc", "replay", "modx:replay.ratio=0.2",
             "modx:train.lr=1e-3"]
    runs = plan(_config(tmp_path), specs, [0, 1], tmp_path / "out")
    shared = {r.label for r in runs if r.shared}
    assert shared == {"finetune", "modx", "modx:alpha=5", "wiseft", "replay", "modx:replay.ratio=0.2"}
    assert {r.shared_replay for r in runs if r.shared} == {0.5}  # the shared run keeps a buffer
    by_seed = {seed: {r.shared_dir for r in runs if r.shared and r.seed == seed} for seed in (0, 1)}
    assert len(by_seed[0]) == len(by_seed[1]) == 1 and by_seed[0] != by_seed[1]  # one per seed
    aligned = plan(_config(tmp_path), ["finetune", "modx"], [0], tmp_path / "out", ["strategy.align_initial=true"])
    assert [r.shared for r in aligned] == [0, 0]  # modx has an old model from phase 0 on: nothing shared


def test_bad_requests_exit_2_with_one_line(tmp_path, capsys):
    assert main(["--config", _config(tmp_path), "--strategies", "nonsense", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy 'nonsense'" in err[0] and "strategy.name" in err[0]
    assert main(["--config", _config(tmp_path), "--strategies", "modx:alpah=5", "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'strategy.alpha'" in capsys.readouterr().err


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
    assert set(bench["table"]) == {"finetune", "modx", "replay"}
    page = (out / "report.html").read_text()
    assert "modx-bench" in page and "data:image/png;base64" in page
    assert (out / "compare" / "report.html").is_file()


def test_the_shared_phase_is_trained_once(bench_dir):
    _, out = bench_dir
    assert len(list((out / "shared").iterdir())) == 1
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert [r["shared_phases"] for r in runs] == [1, 1, 1]
    phase_a = [r["summary"]["matrix"][0] for r in runs]
    assert phase_a[0] == phase_a[1] == phase_a[2]  # every strategy went on from one model


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


def test_a_killed_bench_continues_where_it_stopped(bench_dir):
    tmp, out = bench_dir
    done = out / "runs" / "finetune-seed0" / "summary.json"
    stamp = done.stat().st_mtime_ns
    (out / "runs" / "modx-seed0" / "summary.json").unlink()  # as if killed after its last phase
    (out / "runs" / "modx-seed0" / "bench_cost.json").unlink()
    assert main(["--config", _config(tmp), "--strategies", "finetune", "modx", "replay", "--out", str(out)]) == 0
    assert done.stat().st_mtime_ns == stamp  # a finished run is not trained again
    assert (out / "runs" / "modx-seed0" / "summary.json").is_file()
    assert len(json.loads((out / "bench.json").read_text())["runs"]) == 3

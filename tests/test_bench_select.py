"""modx-bench --select: grids expand to strategy specs, the choice reads the val sets only,
and a tiny grid runs end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from modx.train.bench import BenchError, main
from modx.train.select import choose, expand_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench import _config  # noqa: E402


def test_a_grid_expands_to_every_point_in_the_order_written():
    points = expand_grid("modx:alpha=1,5,20;replay.ratio=0.25,0.5")
    assert [spec for spec, _ in points] == [
        "modx:alpha=1,replay.ratio=0.25", "modx:alpha=1,replay.ratio=0.5",
        "modx:alpha=5,replay.ratio=0.25", "modx:alpha=5,replay.ratio=0.5",
        "modx:alpha=20,replay.ratio=0.25", "modx:alpha=20,replay.ratio=0.5"]
    assert points[3][1] == {"alpha": "5", "replay.ratio": "0.5"}
    assert expand_grid("modx:alpha=1,5,20,replay.ratio=0.25,0.5") == points  # ',' before a key works too
    assert expand_grid("finetune") == [("finetune", {})]
    assert expand_grid("replay:train.lr=1e-3") == [("replay:train.lr=1e-3", {"train.lr": "1e-3"})]


@pytest.mark.parametrize("grid, message", [
    (":alpha=1", "no strategy name"), ("modx:alpha", "key=value"), ("modx:alpha=1,,5", "key=value"),
    ("modx:alpha=1;alpha=5", "given twice"),
])
def test_bad_grids_say_what_is_wrong(grid, message):
    with pytest.raises(BenchError, match=message):
        expand_grid(grid)


def _result(scores: dict[str, tuple[float, float]]) -> dict:
    """bench.json's dict as modx-bench writes it: per spec (val average, test average)."""
    runs = [{"strategy": spec, "seed": 0, "summary": {"val": {"average_recall": val}, "average_recall": test},
             "metrics": {"average_recall": test}} for spec, (val, test) in scores.items()]
    table = {spec: {"average_recall": {"mean": test, "std": 0.0, "n": 1}} for spec, (_, test) in scores.items()}
    return {"runs": runs, "table": table}


def test_the_choice_reads_the_val_sets_only():
    points = expand_grid("modx:alpha=1,5,20")
    # alpha=1 is best on test by far, alpha=5 and alpha=20 tie on val: the first of them wins
    result = _result({"modx:alpha=1": (10.0, 90.0), "modx:alpha=5": (20.0, 5.0), "modx:alpha=20": (20.0, 99.0)})
    selection = choose(result, points)
    assert selection["chosen"]["spec"] == "modx:alpha=5" and selection["chosen"]["params"] == {"alpha": "5"}
    assert selection["chosen"]["val"]["mean"] == 20.0
    assert selection["chosen"]["test"]["average_recall"]["mean"] == 5.0  # reported, not used to choose
    assert [p["val"]["mean"] for p in selection["points"]] == [10.0, 20.0, 20.0]
    for run in result["runs"]:  # any test numbers: the same choice
        run["summary"]["average_recall"] = run["metrics"]["average_recall"] = -run["summary"]["val"]["average_recall"]
    assert choose(result, points)["chosen"]["spec"] == "modx:alpha=5"


def test_a_stream_without_val_sets_cannot_be_tuned():
    result = _result({"modx:alpha=1": (10.0, 90.0)})
    del result["runs"][0]["summary"]["val"]
    with pytest.raises(BenchError, match=r"need val sets \(stream.phases\[\].val"):
        choose(result, expand_grid("modx:alpha=1"))


def test_a_tiny_grid_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", _config(tmp_path), "--select", "modx:alpha=1,50", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    bench = json.loads((out / "bench.json").read_text())
    selection = json.loads((out / "select.json").read_text())
    val = {r["strategy"]: r["summary"]["val"]["average_recall"] for r in bench["runs"]}
    assert set(val) == {"modx:alpha=1", "modx:alpha=50"} and len(list((out / "shared").iterdir())) == 1
    best = max(val, key=lambda spec: (val[spec], spec == "modx:alpha=1"))
    assert selection["chosen"]["spec"] == best and selection["chosen"]["val"]["mean"] == val[best]
    assert selection["chosen"]["test"] == bench["table"][best]
    assert bench["table"][best]["val_average"]["mean"] == val[best]  # the bench table's val column
    assert f"chosen on val: {best}" in said and "val average" in said
    runs = {r["strategy"]: r["summary"] for r in bench["runs"]}
    assert runs[best]["val"]["eval_sets"] == ["a", "b"] and runs[best]["eval_sets"] == ["a", "b"]
    assert main(["--config", _config(tmp_path), "--select", "modx:alpha", "--out", str(out)]) == 2
    assert "key=value" in capsys.readouterr().err

"""modx-bench --select: tune strategy options on the validation sets, report on the test sets.

    modx-bench --config configs/bench_stream.yaml --select "modx:alpha=1,5,20;replay.ratio=0.25,0.5" \\
        --seeds 0 --out runs/select [key=value ...]

A grid is `NAME:key=v1,v2,...;key=v1,v2,...`: `;` between keys (a `,` before `key=` works too),
`,` between one key's values, keys as in `--strategies` (bare: a `strategy.` key; dotted from
another section: as it is). Its points are the cartesian product in the order written, each a
strategy spec `NAME:key=v,key=v` that modx-bench trains as usual (shared phases once, killed
benches resume); several grids compete together.

Selection: the point with the highest val score, the mean over seeds of summary.json's
`val.average_recall` (mean recall on every phase's val set after the last phase); ties go to
the point written first. The test sets (the phases' `eval` sets) play no part in the choice:
`choose` reads the val numbers only. Its test numbers are reported as the result.

Writes OUT/select.json = {"metric", "grids", "points": [{"spec", "params", "val", "val_by_seed"}],
"chosen": {"spec", "params", "val", "test"}} (val: {mean, std, n}; test: the chosen point's
row of bench.json's table) beside modx-bench's bench.json and report.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modx.train.bench import SUMMARY_COLUMNS, BenchError, _cell, _mean_std, run_bench

METRIC = "val.average_recall"  # summary.json key the choice ranks by (mean over seeds)


def expand_grid(grid: str) -> list[tuple[str, dict[str, str]]]:
    """`modx:alpha=1,5;kl_on=batch,replay` -> [("modx:alpha=1,kl_on=batch", {"alpha": "1",
    "kl_on": "batch"}), ...]: every point as a strategy spec and its parameters."""
    name, _, options = grid.partition(":")
    if not name:
        raise BenchError(f"grid {grid!r}: no strategy name before ':'")
    axes: dict[str, list[str]] = {}
    for item in filter(None, (x.strip() for x in re.split(r";|,(?=\s*[A-Za-z_][\w.]*=)", options))):
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(choices):
            raise BenchError(f"grid {grid!r}: write each key as key=value,value,... (got {item!r})")
        if key.strip() in axes:
            raise BenchError(f"grid {grid!r}: key {key.strip()!r} is given twice")
        axes[key.strip()] = choices
    points = []
    for values in itertools.product(*axes.values()):
        params = dict(zip(axes, values))
        options = ",".join(f"{k}={v}" for k, v in params.items())
        points.append((f"{name}:{options}" if options else name, params))
    return points


def choose(result: dict[str, Any], points: Sequence[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """select.json from bench.json's dict: every point's val score and the best point. Reads
    the runs' `summary["val"]` only to choose; the chosen point's test row is copied after."""
    rows: list[dict[str, Any]] = []
    for spec, params in points:
        mine = [r for r in result["runs"] if r["strategy"] == spec]
        by_seed = {r["seed"]: (r["summary"].get("val") or {}).get("average_recall") for r in mine}
        if not mine or None in by_seed.values():
            raise BenchError(f"{spec}: no val score: the stream's phases need val sets "
                             "(stream.phases[].val; built-in phases have them)")
        rows.append({"spec": spec, "params": params, "val": _mean_std(list(by_seed.values())),
                     "val_by_seed": by_seed})
    best = max(range(len(rows)), key=lambda i: (rows[i]["val"]["mean"], -i))
    chosen = {**rows[best], "test": result["table"][rows[best]["spec"]]}
    return {"metric": METRIC, "points": rows, "chosen": chosen}


def format_selection(selection: dict[str, Any]) -> str:
    """The grid's val scores (the chosen point marked) and the chosen point's test numbers."""
    rows = [("*" if p["spec"] == selection["chosen"]["spec"] else " ", p["spec"], _cell(p["val"]))
            for p in selection["points"]]
    width = max(len("point"), *(len(r[1]) for r in rows))
    lines = [f"  {'point':<{width}}  val average (mean recall on the val sets after the last phase, %)"]
    lines += [f"{mark} {spec:<{width}}  {val}" for mark, spec, val in rows]
    chosen = selection["chosen"]
    lines.append(f"chosen on val: {chosen['spec']}; its test numbers (the phases' eval sets):")
    lines.append("  " + "  ".join(f"{title} {_cell(chosen['test'][key])}" for key, title in SUMMARY_COLUMNS))
    return "\n".join(lines)


def run_select(config: str | None, grids: Sequence[str], seeds: Sequence[int], out: str | Path,
               overrides: Sequence[str] = (), reuse: bool = False) -> dict[str, Any]:
    """Train every grid point with modx-bench, choose on val, write OUT/select.json, print."""
    points = [point for grid in grids for point in expand_grid(grid)]
    specs = [spec for spec, _ in points]
    if len(set(specs)) != len(specs):
        raise BenchError("a grid point is given twice (two grids overlap)")
    result = run_bench(config, specs, seeds, out, overrides, reuse)
    selection = {**choose(result, points), "grids": list(grids), "seeds": list(seeds)}
    path = Path(out) / "select.json"
    path.write_text(json.dumps(selection, indent=1) + "\n")
    print(format_selection(selection))
    print(f"wrote {path}")
    return selection

"""report.md + self-contained report.html (plots as PNG beside them and inline in the HTML)
for one run directory or several side by side.

Reads the run files the trainer writes: results.jsonl (required), disorder.jsonl,
config.yaml (for the strategy name). Continual metrics are recomputed from
results.jsonl, so a report of an unfinished run works too.

    modx-report runs/demo                      # -> runs/demo/report.{md,html}
    modx-report runs/finetune runs/modx --out runs/compare
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modx.eval.continual import (
    RecallMatrix,
    continual_metrics,
    is_phase_retrieval,
    recall_matrix,
    retention_reference,
    zeroshot_retention,
)

DEVIATION_KEYS = (
    ("deviation_async_deg", "asynchrony (deg)"),
    ("deviation_relative_rotation_deg", "relative rotation (deg)"),
    ("alignment_change_deg", "alignment change (deg)"),
    ("alignment_flip_i2t", "alignment flips i2t / t2i (dashed)"),
)
DISORDER_COLUMNS = (
    ("rotation_image_deg", "rot img", 2),
    ("rotation_text_deg", "rot txt", 2),
    ("topology_drift_image_deg", "topo img", 2),
    ("topology_drift_text_deg", "topo txt", 2),
    ("rigid_fraction_image", "rigid img", 3),
    ("rigid_fraction_text", "rigid txt", 3),
    ("deviation_async_deg", "async", 2),
    ("deviation_relative_rotation_deg", "rel rot", 2),
    ("alignment_change_deg", "align chg", 2),
    ("alignment_flip_i2t", "flip i2t", 3),
    ("alignment_flip_t2i", "flip t2i", 3),
)


class ReportError(ValueError):
    """A run directory that cannot be reported on (the message says why)."""


@dataclass
class Run:
    path: Path
    label: str
    strategy: str
    results: list[dict[str, Any]]  # phase-end retrieval records
    disorder: list[dict[str, Any]]
    records: list[dict[str, Any]] = field(default_factory=list)  # all of results.jsonl
    matrix: RecallMatrix = field(init=False)  # every retrieval column, held-out ones too
    summary: dict[str, Any] = field(init=False)  # continual metrics of the stream's columns
    zeroshot: dict[str, Any] | None = field(init=False)  # zero-shot accuracy and retention


def load_run(run_dir: str | Path, metric: str = "mean_recall") -> Run:
    """Read one run directory; ReportError when it is missing or has no results."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory not found: {path}")
    results = _read_jsonl(path / "results.jsonl")
    if results is None or not results:
        raise ReportError(f"no results in {path}: expected a non-empty {path / 'results.jsonl'}")
    disorder = _read_jsonl(path / "disorder.jsonl") or []
    phase_ends = [r for r in results if is_phase_retrieval(r)]
    run = Run(path, path.resolve().name, _strategy(path), phase_ends, disorder, results)
    run.matrix = recall_matrix(results, metric)
    run.zeroshot = zeroshot_retention(results, reference=_config_value(path, "eval", "retention_from", "initial"))
    if not run.matrix.values:
        raise ReportError(f"{path / 'results.jsonl'} has no trained phase (only phase -1)")
    stream = run.matrix.columns(held_out=False)
    try:
        run.summary = continual_metrics(stream.values, stream.initial)
    except ValueError:  # more phases than eval sets: no phase <-> set pairing to score
        run.summary = {"n_phases": len(run.matrix.values), "average_recall": None,
                       "forgetting": None, "backward_transfer": None, "forward_transfer": None}  # fmt: skip
    return run


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    metric: str = "mean_recall",
) -> tuple[Path, Path]:
    """Write report.md, report.html and report_*.png for the runs; returns (md, html).

    One run: into its directory unless ``out_dir`` is given; several runs need ``out_dir``.
    """
    if not run_dirs:
        raise ReportError("no run directory given")
    runs = [load_run(d, metric) for d in run_dirs]
    _unique_labels(runs)
    if out_dir is None:
        if len(runs) > 1:
            raise ReportError("several runs need an output directory (--out DIR)")
        out_dir = runs[0].path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(runs, metric)
    return render_report(_blocks(runs, metric, [name for name, _ in figures]), figures, out)


def render_report(blocks: list[tuple], figures: list[tuple[str, bytes]], out: Path) -> tuple[Path, Path]:
    """Write `blocks` (("h1" | "h2" | "h3" | "p", text), ("table", head, rows), ("img", name,
    caption)) as out/report.md with the PNGs beside it and as a self-contained out/report.html."""
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figures:
        (out / name).write_bytes(png)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(_render_md(blocks))
    html_path.write_text(_render_html(blocks, dict(figures)))
    return md_path, html_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modx-report",
        description="Write report.md and report.html (with PNG plots) for modx run directories.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", metavar="DIR", help="output directory (needed for several runs)")
    parser.add_argument("--metric", default="mean_recall", help="recall key for the matrix")
    args = parser.parse_args(argv)
    try:
        md, page = write_report(args.run_dirs, args.out, args.metric)
    except ReportError as e:
        print(f"modx-report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md} and {page}")
    return 0


# ---- reading -------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    return records


def _strategy(path: Path) -> str:
    return _config_value(path, "strategy", "name", "?")


def _config_value(path: Path, section: str, key: str, default: str) -> str:
    """`section.key` of the run's config.yaml (`default` without one)."""
    cfg = path / "config.yaml"
    if not cfg.is_file():
        return default
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text()) or {}
        return str(data.get(section, {}).get(key, default))
    except (yaml.YAMLError, AttributeError):
        return default


def _unique_labels(runs: list[Run]) -> None:
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.path.resolve().parent.name}/{r.label}"


def _disorder_by_phase(run: Run, reference: str) -> dict[int, list[dict[str, Any]]]:
    """phase -> metric dicts of every eval set (the last record per cell wins)."""
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    for rec in run.disorder:
        if rec.get("reference") == reference:
            cells[(int(rec["phase"]), str(rec["eval_set"]))] = rec["metrics"]
    out: dict[int, list[dict[str, Any]]] = {}
    for (phase, _), metrics in sorted(cells.items()):
        out.setdefault(phase, []).append(metrics)
    return out


def _mean(metrics: list[dict[str, Any]], key: str) -> float:
    vals = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
    return float(np.mean(vals)) if vals else math.nan


def _last_retrieval(run: Run) -> tuple[list[str], list[list[Any]]]:
    last = max(int(r["phase"]) for r in run.results)
    cells = {str(r["eval_set"]): r["metrics"] for r in run.results if int(r["phase"]) == last}
    keys = [k for k in next(iter(cells.values())) if "R@" in k] + ["mean_recall"]
    rows = [[s] + [_fmt(cells[s].get(k)) for k in keys] for s in run.matrix.eval_sets if s in cells]
    return ["eval set"] + keys, rows


# ---- document blocks, rendered as Markdown and HTML ----------------------------------


def _blocks(runs: list[Run], metric: str, figures: list[str]) -> list[tuple]:
    b: list[tuple] = [("h1", "modx report: " + ", ".join(r.label for r in runs))]
    b.append(("p", f"Recall metric: `{metric}` (percent). Continual metrics: average = mean "
                   "recall over the domains seen, after the last phase; forgetting = best earlier "
                   "minus last (Chaudhry et al.); BWT / FWT as in GEM."))  # fmt: skip
    head = ["run", "strategy", "phases", "average", "forgetting", "BWT", "FWT"]
    rows = [
        [r.label, r.strategy, str(r.summary["n_phases"])]
        + [
            _fmt(r.summary[k])
            for k in ("average_recall", "forgetting", "backward_transfer", "forward_transfer")
        ]  # fmt: skip
        for r in runs
    ]
    if any(r.zeroshot for r in runs):
        head.append("zero-shot retention (%)")
        for row, r in zip(rows, runs):
            row.append(_fmt(r.zeroshot["mean_retention"]) if r.zeroshot else "-")
    b += [("h2", "Summary"), ("table", head, rows)]
    if any(any(r.matrix.held_out) for r in runs):
        b.append(("p", "Columns marked * are held-out retrieval sets (`eval.retrieval`): shown, "
                       "but not part of the continual averages."))  # fmt: skip
    if any(r.zeroshot for r in runs):
        b.append(("p", "Zero-shot retention: top-1 zero-shot accuracy after the last phase as a "
                       "percentage of the reference model's (the initial model, or the model after "
                       "the phase eval.retention_from names), averaged over the zero-shot sets; "
                       "omitted (-) where the reference has random weights."))  # fmt: skip
    captions = {
        "report_recall_matrix.png": "Recall matrix: rows = model after each phase, columns = eval set.",
        "report_recall_curves.png": "Recall of each domain across phases (shaded: the phase training on it).",
        "report_rotation_hist.png": "Rotation angle of each probe sample against the previous phase's model.",
        "report_deviation.png": "Inter-modal deviation across phases (mean over eval sets).",
        "report_zeroshot.png": "Zero-shot top-1 accuracy of each zero-shot set across phases.",
        "report_learning_curves.png": "Learning curves: every evaluation (eval.every and phase "
        "ends) by optimiser step; dotted lines mark phase ends.",
    }
    b.append(("h2", "Plots"))
    b += [("img", name, captions[name]) for name in figures]
    for r in runs:
        b.append(("h2", f"Run {r.label} ({r.strategy})"))
        b.append(("p", f"Directory: `{r.path}`"))
        m = r.matrix
        rows = [["initial"] + [_fmt(x) for x in m.initial]] if m.initial else []
        rows += [[p] + [_fmt(x) for x in row] for p, row in zip(m.phases, m.values)]
        b += [("h3", f"Recall matrix ({metric})"), ("table", ["after phase"] + _columns(m), rows)]
        if r.zeroshot:
            z = r.zeroshot
            rows = [["initial"] + [_fmt(x) for x in z["initial"]]] if z["initial"] else []
            rows += [[p] + [f"{_fmt(v)} ({_fmt(k, 0)}%)" if k is not None else _fmt(v) for v, k in zip(row, kept)]
                     for p, row, kept in zip(z["phases"], z["matrix"], z["retention"])]  # fmt: skip
            title = "Zero-shot top-1 accuracy" + ("" if z["omitted"] else f" (retention: % of the accuracy of {retention_reference(z)})")
            b += [("h3", title), ("table", ["after phase"] + z["eval_sets"], rows)]
            if z["omitted"]:
                b.append(("p", f"Zero-shot retention omitted: {z['omitted']}."))
        head, rows = _last_retrieval(r)
        b += [("h3", "Retrieval after the last evaluated phase"), ("table", head, rows)]
        for reference in ("previous", "initial"):
            per_phase = _disorder_by_phase(r, reference)
            if not per_phase:
                continue
            names = dict(zip(range(len(m.phases)), m.phases))
            rows = [
                [names.get(p, str(p))] + [_fmt(_mean(ms, k), d) for k, _, d in DISORDER_COLUMNS]
                for p, ms in per_phase.items()
            ]
            b.append(("h3", f"Spatial disorder vs the {reference} model (mean over eval sets)"))
            b.append(("table", ["phase"] + [h for _, h, _ in DISORDER_COLUMNS], rows))
    return b


def _columns(m: RecallMatrix) -> list[str]:
    flags = m.held_out or (False,) * len(m.eval_sets)
    return [f"{s}*" if h else s for s, h in zip(m.eval_sets, flags)]


def _render_md(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            head, rows = rest
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            out += ["| " + " | ".join(row) + " |" for row in rows]
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})\n\n*{rest[1]}*")
        out.append("")
    return "\n".join(out)


def _render_html(blocks: list[tuple], figures: dict[str, bytes]) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_code(rest[0])}</p>")
        elif kind == "table":
            head, rows = rest
            th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            trs = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in rows
            )
            body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(figures[rest[0]]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(rest[1])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "th{background:#f3f3f3}td:first-child{text-align:left}"
        "img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>modx report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return f"{x:.{digits}f}"
    return "-"


# ---- figures -------------------------------------------------------------------------


def _figures(runs: list[Run], metric: str) -> list[tuple[str, bytes]]:
    figs = [
        ("report_recall_matrix.png", _plot_matrix(runs, metric)),
        ("report_recall_curves.png", _plot_curves(runs, metric)),
    ]
    if any(r.disorder for r in runs):
        figs.append(("report_rotation_hist.png", _plot_rotation_hist(runs)))
        figs.append(("report_deviation.png", _plot_deviation(runs)))
    if any(r.zeroshot for r in runs):
        figs.append(("report_zeroshot.png", _plot_zeroshot(runs)))
    if any(rec.get("in_phase") for r in runs for rec in r.records):
        figs.append(("report_learning_curves.png", _plot_learning_curves(runs, metric)))
    return figs


def figure_png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _phase_axis(runs: list[Run]) -> tuple[list[int], list[str]]:
    longest = max(runs, key=lambda r: len(r.matrix.phases))
    xs = ([-1] if any(r.matrix.initial for r in runs) else []) + list(
        range(len(longest.matrix.phases))
    )
    labels = ["initial" if x < 0 else longest.matrix.phases[x] for x in xs]
    return xs, labels


def _plot_matrix(runs: list[Run], metric: str) -> bytes:
    fig = new_figure(1.2 + 3.6 * len(runs), 3.4)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    vmax = max(float(np.nanmax(np.asarray(r.matrix.values, float))) for r in runs)
    vmax = vmax if math.isfinite(vmax) and vmax > 0 else 100.0
    for ax, r in zip(axes, runs):
        m = r.matrix
        rows = ([m.initial] if m.initial else []) + m.values
        names = (["initial"] if m.initial else []) + m.phases
        data = np.asarray(rows, dtype=float)  # (phases (+1), eval sets)
        im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(data):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center",
                        color="white" if v < 0.6 * vmax else "black", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(m.eval_sets)), m.eval_sets, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("eval set")
        ax.set_ylabel("model after phase")
        ax.set_title(f"{r.label} ({r.strategy})", fontsize=10)
    fig.colorbar(im, ax=list(axes), label=f"{metric} (%)")
    return figure_png(fig)


def _plot_curves(runs: list[Run], metric: str) -> bytes:
    sets = list(dict.fromkeys(s for r in runs for s in r.matrix.eval_sets))
    cols = min(len(sets), 4)
    nrows = math.ceil(len(sets) / cols)
    fig = new_figure(3.3 * cols, 2.8 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    xs, labels = _phase_axis(runs)
    held = {s for r in runs for s in r.matrix.columns(held_out=True).eval_sets}
    for j, (ax, name) in enumerate(zip(axes, sets)):
        if name not in held:  # a held-out set has no phase training on it
            ax.axvspan(j - 0.5, j + 0.5, color="0.92")
        for r in runs:
            if name not in r.matrix.eval_sets:
                continue
            k = r.matrix.eval_sets.index(name)
            px = ([-1] if r.matrix.initial else []) + list(range(len(r.matrix.values)))
            py = ([r.matrix.initial[k]] if r.matrix.initial else []) + [
                row[k] for row in r.matrix.values
            ]
            ax.plot(px, py, marker="o", label=r.label)
        ax.set_title(f"{name} (held out)" if name in held else name, fontsize=10)
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
        ax.set_ylabel(f"{metric} (%)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(sets) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    return figure_png(fig)


def _plot_rotation_hist(runs: list[Run]) -> bytes:
    fig = new_figure(1.0 + 3.6 * len(runs), 5.0)
    axes = fig.subplots(2, len(runs), squeeze=False, sharex=True)
    top = 1.0
    for c, r in enumerate(runs):
        per_phase = _disorder_by_phase(r, "previous")
        for row, modality in enumerate(("image", "text")):
            ax = axes[row, c]
            for phase, ms in per_phase.items():
                counts = [
                    m[f"rotation_{modality}_hist"] for m in ms if f"rotation_{modality}_hist" in m
                ]
                if not counts:
                    continue
                edges = np.asarray(ms[0]["rotation_hist_edges_deg"])
                total = np.sum(counts, axis=0)  # pooled over eval sets
                name = r.matrix.phases[phase] if 0 <= phase < len(r.matrix.phases) else str(phase)
                ax.stairs(total / max(total.sum(), 1), edges, label=name)
                nz = np.flatnonzero(total)
                if len(nz):
                    top = max(top, float(edges[nz[-1] + 1]))
            ax.set_title(f"{r.label}: {modality}", fontsize=10)
            ax.set_ylabel("fraction of probe", fontsize=8)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("rotation angle vs previous model (deg)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, title="phase", title_fontsize=7)
    axes[0, 0].set_xlim(0, min(180.0, top + 2.0))
    return figure_png(fig)


def _plot_deviation(runs: list[Run]) -> bytes:
    fig = new_figure(3.2 * len(DEVIATION_KEYS), 5.2)
    axes = fig.subplots(2, len(DEVIATION_KEYS), squeeze=False, sharex=True)
    xs, labels = _phase_axis(runs)
    xs, labels = [x for x in xs if x >= 0], [n for x, n in zip(xs, labels) if x >= 0]
    for row, reference in enumerate(("previous", "initial")):
        for c, (key, title) in enumerate(DEVIATION_KEYS):
            ax = axes[row, c]
            for i, r in enumerate(runs):
                per_phase = _disorder_by_phase(r, reference)
                px = sorted(per_phase)
                color = f"C{i}"
                ax.plot(px, [_mean(per_phase[p], key) for p in px], marker="o", color=color,
                        label=r.label)  # fmt: skip
                if key == "alignment_flip_i2t":
                    ys = [_mean(per_phase[p], "alignment_flip_t2i") for p in px]
                    ax.plot(px, ys, marker="x", linestyle="--", color=color)
            ax.set_title(f"{title}\nvs {reference} model", fontsize=9)
            ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return figure_png(fig)



def _plot_zeroshot(runs: list[Run]) -> bytes:
    sets = list(dict.fromkeys(s for r in runs if r.zeroshot for s in r.zeroshot["eval_sets"]))
    fig = new_figure(3.3 * len(sets), 2.8)
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    xs, labels = _phase_axis(runs)
    for ax, name in zip(axes, sets):
        for r in runs:
            z = r.zeroshot
            if not z or name not in z["eval_sets"]:
                continue
            k = z["eval_sets"].index(name)
            px = ([-1] if z["initial"] else []) + list(range(len(z["matrix"])))
            py = ([z["initial"][k]] if z["initial"] else []) + [row[k] for row in z["matrix"]]
            ax.plot(px, [math.nan if v is None else v for v in py], marker="o", label=r.label)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("zero-shot top-1 (%)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return figure_png(fig)


def _plot_learning_curves(runs: list[Run], metric: str) -> bytes:
    """Every evaluation of every set by optimiser step (retrieval: `metric`; zero-shot: acc1)."""
    def value(rec: dict[str, Any]) -> float:
        v = rec["metrics"].get("acc1" if rec.get("kind") == "zeroshot" else metric)
        return math.nan if v is None else float(v)

    sets = list(dict.fromkeys((rec.get("kind", "retrieval"), rec["eval_set"]) for r in runs for rec in r.records))
    cols = min(len(sets), 4)
    nrows = math.ceil(len(sets) / cols)
    fig = new_figure(3.3 * cols, 2.8 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (kind, name) in zip(axes, sets):
        for i, r in enumerate(runs):
            points = {int(rec["step"]): value(rec) for rec in r.records
                      if rec.get("kind", "retrieval") == kind and rec["eval_set"] == name}  # fmt: skip
            steps = sorted(points)
            ax.plot(steps, [points[x] for x in steps], marker=".", color=f"C{i}", label=r.label)
            ends = sorted({int(rec["step"]) for rec in r.results if int(rec["phase"]) >= 0})
            for x in ends:
                ax.axvline(x, color=f"C{i}", linestyle=":", alpha=0.5)
        what = {"zeroshot": "zero-shot top-1", "val": f"val set, {metric}"}.get(kind, metric)
        ax.set_title(f"{name} ({what})", fontsize=9)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(sets) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    return figure_png(fig)


if __name__ == "__main__":
    raise SystemExit(main())

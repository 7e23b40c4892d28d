"""modx.eval.report / modx-report: report.md + self-contained report.html with PNG plots."""

import json
import re
import shutil
from pathlib import Path

import pytest
from _eval_helpers import DOMAINS, make_run

from modx.eval.continual import continual_metrics, recall_matrix
from modx.eval.report import main, write_report

FIGURES = ("report_recall_matrix.png", "report_recall_curves.png", "report_rotation_hist.png",
           "report_deviation.png")  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "finetune", "finetune", 0.5, seed=0, n=40), make_run(
        root / "modx", "modx", 0.1, seed=0, n=40
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_single_run_report_in_run_dir_holds_the_numbers_and_inline_pngs(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / "ft"))
    md_path, html_path = write_report([run])
    assert md_path == run / "report.md" and html_path == run / "report.html"
    md, page = md_path.read_text(), html_path.read_text()
    for name in FIGURES:
        png = (run / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert f"({name})" in md
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'src="(?!data:)', page)  # self-contained: no external files
    m = recall_matrix(records(run))
    for row in [m.initial, *m.values]:
        cells = " | ".join(f"{v:.2f}" for v in row)
        assert cells in md
        assert "</td><td>".join(f"{v:.2f}" for v in row) in page
    summary = continual_metrics(m.values, m.initial)
    assert f"| {summary['average_recall']:.2f} | {summary['forgetting']:.2f} |" in md
    last = [r for r in records(run) if r["phase"] == 2 and r["eval_set"] == "digits"][0]
    assert f"| digits | {last['metrics']['i2t_R@1']:.2f} |" in md
    assert (
        "Spatial disorder vs the previous model" in md and "Spatial disorder vs the initial" in md
    )


def test_several_runs_side_by_side_with_out_dir(runs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| finetune | finetune | 3 |" in md and "| modx | modx | 3 |" in md
    assert "## Run finetune (finetune)" in md and "## Run modx (modx)" in md
    assert all((out / name).is_file() for name in FIGURES)
    assert "report.html" in capsys.readouterr().out


def test_run_without_disorder_gets_the_recall_plots_only(runs, tmp_path):
    run = Path(shutil.copytree(runs[1], tmp_path / "nodis"))
    (run / "disorder.jsonl").unlink()
    md, _ = write_report([run], tmp_path / "out")
    assert (tmp_path / "out" / "report_recall_matrix.png").is_file()
    assert not (tmp_path / "out" / "report_deviation.png").exists()
    assert "Spatial disorder" not in md.read_text()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "run directory not found"),
        ("no_results", "results.jsonl"),
        ("empty_results", "results.jsonl"),
        ("bad_json", "not valid JSON"),
        ("several_without_out", "--out"),
    ],
)
def test_bad_input_exits_2_with_one_message(runs, tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    args = [str(run)]
    if setup != "missing":
        run.mkdir()
    if setup == "empty_results":
        (run / "results.jsonl").write_text("\n")
    if setup == "bad_json":
        (run / "results.jsonl").write_text('{"phase": 0,\n')
    if setup == "several_without_out":
        args = [str(runs[0]), str(runs[1])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modx-report: error:") and message in err and "\n" not in err


def test_zero_shot_held_out_and_learning_curves_in_the_report(runs, tmp_path):
    run = tmp_path / "zs"
    shutil.copytree(runs[1], run)
    extra = []
    for phase in (-1, 0, 1, 2):
        name = "initial" if phase < 0 else DOMAINS[phase]
        base = {"phase": phase, "phase_name": name, "step": 10 * (phase + 1)}
        extra.append({"kind": "zeroshot", **base, "eval_set": "digits-zs", "eval_index": 0,
                      "metrics": {"acc1": 40.0 - 6 * (phase + 1), "acc5": 90.0}})  # fmt: skip
        extra.append({"kind": "retrieval", **base, "eval_set": "coco", "eval_index": 3, "held_out": True,
                      "metrics": {"mean_recall": 12.5, "i2t_R@1": 1.0}})  # fmt: skip
        if phase >= 0:
            extra.append({"kind": "retrieval", **base, "step": base["step"] - 5, "in_phase": True,
                          "eval_set": "digits", "eval_index": 0, "metrics": {"mean_recall": 1.0}})  # fmt: skip
    with (run / "results.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in extra))
    md, _ = write_report([run])
    text = md.read_text()
    assert "coco*" in text and "| shapes | 22.00 (55%) |" in text
    assert (run / "report_zeroshot.png").is_file() and (run / "report_learning_curves.png").is_file()
    plain = write_report([runs[1]], tmp_path / "plain")[0].read_text()
    def summary_cells(t):
        return next(line for line in t.splitlines() if " | modx | " in line).split(" | ")[1:]

    zs, base = summary_cells(text), summary_cells(plain)
    assert zs[:-1] == base[:-1] + [base[-1].rstrip(" |")]  # the held-out set is left out of the averages
    assert zs[-1] == "55.00 |"

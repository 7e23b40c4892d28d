"""Phase-end evaluation (main process only): retrieval on every eval set (and every
phase's validation set), spatial disorder of a fixed probe against the previous and the
initial model, the final summary and report.

Appends to results.jsonl and disorder.jsonl (formats in docs/training.md). The probe's
embeddings of every evaluated model are kept under checkpoints/probe/ so that a resumed run
still compares with the previous and the initial model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modx.config import Config
from modx.data.urls import DataError
from modx.eval.continual import retention_reference
from modx.train.faults import fault_point


class Evaluator:
    """Evaluates a model on the stream's eval sets, the held-out retrieval sets and the
    zero-shot sets. Every process calls `evaluate` (each embeds its share of every set);
    the metrics are computed and the files written on the main process."""

    def __init__(
        self,
        cfg: Config,
        eval_sets: list[tuple[str, str]],
        preprocess: Callable,
        tokenizer: Callable,
        run_dir: Path,
        device: torch.device,
        *,
        held_out: list[tuple[str, str]] | None = None,
        zeroshot: list[tuple[str, str]] | None = None,
        val_sets: list[tuple[str, str]] | None = None,
        random_init: bool = False,
        accelerator: Any = None,
    ):
        self.cfg = cfg
        self.eval_sets = eval_sets  # (name, urls) of every phase, in stream order
        self.val_sets = val_sets or []  # (name, urls) of every phase ("": no val set), in stream order
        self.random_init = random_init  # the initial model's weights are random (no retention against it)
        self.held_out = held_out or []  # (name, urls): extra columns, not in the continual averages
        self.zeroshot = zeroshot or []  # (name, CLIP_benchmark directory)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.accelerator = accelerator
        self.main = accelerator is None or accelerator.is_main_process
        self.results = run_dir / "results.jsonl"
        self.disorder = run_dir / "disorder.jsonl"
        self.summary = run_dir / "summary.json"
        self.run_dir = run_dir
        self.probe_dir = run_dir / "checkpoints" / "probe"

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, phase: int, phase_name: str, step: int, *, in_phase: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Retrieval on every eval set (the stream's, then the held-out ones), zero-shot
        accuracy on every zero-shot set, and at a phase end (and for the initial model)
        retrieval on every phase's val set and SD vs the previous and the initial model.
        `in_phase`: an `eval.every` evaluation inside a phase (no val sets, no SD).
        Returns the metrics by set name on the main process ({} elsewhere). Evaluation
        leaves torch's global RNG as it found it (the eval loaders draw from it), so
        adding eval sets or `eval.every` does not change the training run."""
        with torch.random.fork_rng(devices=[]):
            return self._evaluate(model, phase, phase_name, step, in_phase)

    def _evaluate(self, model: nn.Module, phase: int, phase_name: str, step: int, in_phase: bool) -> dict[str, dict[str, Any]]:
        was_training = model.training
        model.eval()
        row: dict[str, dict[str, Any]] = {}
        probe: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        scored: dict[str, Any] = {}  # by URLs: phases that share an eval set embed it once
        base = {"phase": phase, "phase_name": phase_name, "step": step} | ({"in_phase": True} if in_phase else {})
        sets = [(name, urls, False) for name, urls in self.eval_sets] + [(n, u, True) for n, u in self.held_out]
        for j, (name, urls, held_out) in enumerate(sets):
            if urls not in scored:
                scored[urls] = self._score(model, urls)
            if self.main:
                row[name], pairs = scored[urls]
                if not held_out and pairs is not None:
                    probe[name] = pairs
                extra = {"held_out": True} if held_out else {}
                _append(self.results, {"kind": "retrieval", **base, "eval_set": name, "eval_index": j, **extra, "metrics": row[name]})
            fault_point("evaluate")
        for j, (name, urls) in enumerate(self.val_sets if not in_phase else []):
            if not urls:
                continue
            if urls not in scored:
                scored[urls] = self._score(model, urls)
            if self.main:  # not in `row`: the val sets share the phases' names
                _append(self.results, {"kind": "val", **base, "eval_set": name, "eval_index": j, "metrics": scored[urls][0]})
        random = {"random_init": True} if phase == -1 and self.random_init else {}
        for j, (name, root) in enumerate(self.zeroshot):
            metrics = self._zeroshot(model, root)
            if self.main:
                row[name] = metrics
                _append(self.results, {"kind": "zeroshot", **base, **random, "eval_set": name, "eval_index": j,
                                       "metrics": metrics})
        model.train(was_training)
        if self.main and not in_phase:
            self.probe_dir.mkdir(parents=True, exist_ok=True)
            torch.save(probe, self.probe_dir / f"phase{phase}.pt")
            if phase >= 0 and self.cfg.eval.probe > 0:
                self._disorder(probe, phase, phase_name)
        return row

    def due(self, global_step: int, phase_step: int, phase_steps: int) -> bool:
        """Whether `eval.every` asks for an evaluation inside the phase after this step."""
        every = self.cfg.eval.every
        return every > 0 and global_step % every == 0 and phase_step + 1 < phase_steps

    def headline(self, row: dict[str, dict[str, Any]]) -> str:
        """One line: mean recall of the retrieval sets, top-1 of the zero-shot sets (%)."""
        parts = [f"{name} {m['mean_recall']:.1f}" for name, m in row.items() if "mean_recall" in m]
        text = "  ".join(parts) + "  (mean recall, %)"
        zs = [f"{name} {m['acc1']:.1f}" for name, m in row.items() if "acc1" in m]
        return text + ("  zero-shot " + "  ".join(zs) + "  (top-1, %)" if zs else "")

    def _score(self, model: nn.Module, urls: str) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None] | None:
        """Retrieval metrics of one eval set and its probe pairs' embeddings (main process;
        None on the others, which only embed their share). Unreadable shards are skipped and
        counted (`skipped`); with none readable, only the error."""
        from modx.eval.embed import embed_dataset
        from modx.eval.retrieval import retrieval_metrics

        e = self.cfg.eval
        try:
            emb = embed_dataset(
                model, urls, preprocess=self.preprocess, tokenizer=self.tokenizer, batch_size=e.batch_size,
                workers=e.workers, accelerator=self.accelerator, device=self.device, progress=False,
                missing_ok=True,
            )  # fmt: skip
        except DataError as err:
            if not self.main:
                return None
            warnings.warn(f"eval set {urls} skipped: {err}", stacklevel=2)
            return {"error": str(err)}, None
        if not self.main:
            return None
        metrics = retrieval_metrics(emb.image, emb.text, emb.text_image_ids, ks=tuple(e.ks), backend=e.backend)
        metrics = {k: _plain(v) for k, v in metrics.items()}
        metrics.update(n_images=len(emb.image), n_texts=len(emb.text), skipped=emb.stats.get("skipped", 0))
        return metrics, probe_pairs(emb.image, emb.text, emb.text_image_ids, e.probe)

    def _zeroshot(self, model: nn.Module, root: str) -> dict[str, Any] | None:
        from modx.eval.zeroshot import evaluate_zeroshot, json_metrics

        e = self.cfg.eval
        metrics = evaluate_zeroshot(
            model, root, preprocess=self.preprocess, tokenizer=self.tokenizer, batch_size=e.batch_size,
            workers=e.workers, accelerator=self.accelerator, device=self.device,
        )  # fmt: skip
        if metrics is None:
            return None
        metrics.pop("stats", None)
        return json_metrics({k: _plain(v) for k, v in metrics.items()})

    def _disorder(self, probe: dict[str, tuple[torch.Tensor, torch.Tensor]], phase: int, phase_name: str) -> None:
        from modx.eval.disorder import spatial_disorder

        for reference, ref_phase in (("previous", phase - 1), ("initial", -1)):
            path = self.probe_dir / f"phase{ref_phase}.pt"
            if not path.is_file():
                continue
            ref = torch.load(path, weights_only=True)
            for name, (img, txt) in probe.items():
                if name not in ref:  # its eval set was unreadable then
                    continue
                img_old, txt_old = ref[name]
                with warnings.catch_warnings():  # small probes of tiny models are often rank deficient
                    warnings.filterwarnings("ignore", message="probe of .* does not span")
                    metrics = spatial_disorder(img_old.numpy(), txt_old.numpy(), img.numpy(), txt.numpy())
                _append(self.disorder, {
                    "phase": phase, "phase_name": phase_name, "eval_set": name,
                    "reference": reference, "metrics": {k: _plain(v) for k, v in metrics.items()},
                })

    def forget_from(self, phase: int, global_step: int | None = None) -> None:
        """Drop records of phases >= `phase` (a resumed run evaluates them again); records
        made inside phase `phase` up to `global_step` stay (the run resumes after them)."""
        for path in (self.results, self.disorder):
            if path.is_file():
                keep = [line for line in path.read_text().splitlines() if line.strip() and _kept(json.loads(line), phase, global_step)]
                path.write_text("".join(line + "\n" for line in keep))

    def reset(self) -> None:
        """Start a fresh run: remove the previous run's records."""
        for path in (self.results, self.disorder, self.summary):
            path.unlink(missing_ok=True)

    def finish(self, metric: str = "mean_recall", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json (continual metrics of the recall matrix, zero-shot retention,
        held-out sets, plus `extra`: the training's skipped_steps and cost), the report;
        print them."""
        from modx.eval.continual import continual_metrics, recall_matrix, zeroshot_retention

        records = [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]
        full = recall_matrix(records, metric=metric)
        matrix = full.columns(held_out=False)
        summary = continual_metrics(matrix.values, matrix.initial)
        summary.update(
            metric=metric, strategy=self.cfg.strategy.name, phases=matrix.phases,
            eval_sets=matrix.eval_sets, matrix=matrix.values, initial=matrix.initial,
            disorder=disorder_summary(self.disorder), **(extra or {}),
        )
        held = full.columns(held_out=True)
        if held.eval_sets:
            summary["held_out"] = {"eval_sets": held.eval_sets, "matrix": held.values, "initial": held.initial}
        val = val_summary(records, metric)
        if val is not None:
            summary["val"] = val
        zeroshot = zeroshot_retention(records, reference=self.cfg.eval.retention_from)
        if zeroshot is not None:
            summary["zeroshot"] = zeroshot
            summary["zeroshot_retention"] = zeroshot["mean_retention"]
        reference = None
        if self.cfg.eval.reference:
            reference = json.loads(Path(self.cfg.eval.reference).read_text())
            summary["reference"] = {"path": self.cfg.eval.reference, **headline(reference)}
        self.summary.write_text(json.dumps(summary, indent=2, default=_plain) + "\n")
        print(format_summary(summary))
        if reference is not None:
            print(format_comparison(summary, reference, self.cfg.eval.reference))
        if self.cfg.eval.report:
            from modx.eval.report import write_report

            md, _ = write_report([self.run_dir])
            print(f"report: {md}")
        return summary


def val_summary(records: list[dict[str, Any]], metric: str = "mean_recall") -> dict[str, Any] | None:
    """summary.json's "val" (None without val records): the val recall matrix (rows = after
    phase, columns = the phases' val sets), its initial row, `average_recall` = the mean of
    the last row over every val set (what `modx-bench --select` ranks by; None when a cell
    is missing) and, when every phase has a val set, `forgetting` on them."""
    from modx.eval.continual import continual_metrics, recall_matrix

    val = recall_matrix(records, metric=metric, kind="val")
    if not val.eval_sets:
        return None
    last = val.values[-1] if val.values else []
    average = sum(last) / len(last) if last and all(math.isfinite(x) for x in last) else None
    forgetting = None
    if val.eval_sets == val.phases:  # set j is the one phase j trains on
        forgetting = continual_metrics(val.values, val.initial)["forgetting"]
    return {"phases": val.phases, "eval_sets": val.eval_sets, "matrix": val.values, "initial": val.initial,
            "average_recall": average, "forgetting": forgetting}


def _kept(record: dict[str, Any], phase: int, global_step: int | None) -> bool:
    if record["phase"] < phase:
        return True
    inside = record.get("in_phase", False) and record["phase"] == phase
    return inside and global_step is not None and record["step"] <= global_step


def probe_pairs(image: Any, text: Any, text_image_ids: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of an eval set with their first caption: (n, d), (n, d)."""
    image, text = torch.as_tensor(image).float(), torch.as_tensor(text).float()
    ids = torch.as_tensor(text_image_ids).long()
    first = torch.full((len(image),), len(text), dtype=torch.long)
    first.scatter_reduce_(0, ids, torch.arange(len(ids)), reduce="amin")
    rows = torch.nonzero(first < len(text)).flatten()[:n]
    return image[rows].contiguous(), text[first[rows]].contiguous()


def disorder_summary(path: Path) -> dict[str, Any]:
    """Per reference, phase and eval set, the headline SD numbers (for the summary / print)."""
    keys = ("rotation_image_deg", "rotation_text_deg", "deviation_async_deg", "alignment_change_deg", "alignment_flip_i2t")
    out: dict[str, Any] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            cell = {k: rec["metrics"].get(k) for k in keys}
            out.setdefault(rec["reference"], {}).setdefault(rec["phase_name"], {})[rec["eval_set"]] = cell
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The recall matrix (held-out sets as extra columns, marked *), forgetting, zero-shot
    retention and an SD summary as plain text."""
    metric = summary["metric"]
    held = summary.get("held_out") or {"eval_sets": [], "matrix": [[] for _ in summary["matrix"]], "initial": []}
    sets = summary["eval_sets"] + [f"{s}*" for s in held["eval_sets"]]
    title = f"recall matrix ({metric}, %): rows = after phase, columns = eval set"
    lines = _table(title + (" (* held out)" if held["eval_sets"] else ""), sets, summary["phases"],
                   [a + b for a, b in zip(summary["matrix"], held["matrix"])],
                   summary["initial"] + (held["initial"] or []) if summary["initial"] else None)  # fmt: skip
    lines.append(
        f"average {_fmt(summary['average_recall'])}  forgetting {_fmt(summary['forgetting'])}  "
        f"backward transfer {_fmt(summary['backward_transfer'])}  forward transfer {_fmt(summary['forward_transfer'])}"
    )
    val = summary.get("val")
    if val:
        lines.append(f"validation sets ({', '.join(val['eval_sets'])}): average {_fmt(val['average_recall'])}  "
                     f"forgetting {_fmt(val['forgetting'])}  (for model selection; summary.json 'val')")
    zs = summary.get("zeroshot")
    if zs:
        lines += format_zeroshot(zs)
    first = sets[0]
    for reference in ("initial", "previous"):
        per_phase = summary["disorder"].get(reference, {})
        if per_phase:
            lines.append(f"spatial disorder on '{first}' vs the {reference} model (degrees; flips as fractions):")
            for name, cells in per_phase.items():
                c = cells.get(first, {})
                lines.append(
                    f"  {name[:11]:<12} rotation img {_fmt(c.get('rotation_image_deg'))} txt {_fmt(c.get('rotation_text_deg'))}"
                    f"  async {_fmt(c.get('deviation_async_deg'))}  alignment change {_fmt(c.get('alignment_change_deg'))}"
                    f"  i2t flips {_fmt(c.get('alignment_flip_i2t'), 3)}"
                )
    return "\n".join(lines)


def format_zeroshot(zs: dict[str, Any]) -> list[str]:
    """The zero-shot accuracy table with the retention of every cell, and the mean retention
    after the last phase, or the reason why retention is omitted."""
    if zs.get("omitted"):
        lines = _table(f"zero-shot accuracy ({zs['metric']}, %)", zs["eval_sets"], zs["phases"], zs["matrix"],
                       zs["initial"])  # fmt: skip
        return lines + [f"zero-shot retention omitted: {zs['omitted']}"]
    title = f"zero-shot accuracy ({zs['metric']}, %) and retention (% of the accuracy of {retention_reference(zs)})"
    cells = [[f"{_fmt(v)} ({_fmt(r, 0)}%)" if r is not None else _fmt(v) for v, r in zip(row, kept)]
             for row, kept in zip(zs["matrix"], zs["retention"])]  # fmt: skip
    lines = _table(title, zs["eval_sets"], zs["phases"], cells, zs["initial"])
    return lines + [f"mean zero-shot retention after the last phase {_fmt(zs['mean_retention'])}% "
                    f"(of the accuracy of {retention_reference(zs)})"]


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """What a comparison of runs reads from a summary.json: the strategy, the continual
    metrics, plasticity (mean recall on each domain right after its phase), the first
    domain's recall right after its phase and at the end, the val sets' average recall
    (val_average) and the zero-shot retention (None where absent or omitted)."""
    learned = [x for x in summary.get("learned_recall") or [] if x is not None]
    last = summary.get("last_recall") or [None]
    out = {k: summary.get(k) for k in ("strategy", "average_recall", "forgetting", "backward_transfer",
                                       "forward_transfer", "last_recall", "learned_recall")}
    out["plasticity"] = sum(learned) / len(learned) if learned else None
    out["first_learned"] = learned[0] if learned else None
    out["first_last"] = last[0]
    out["val_average"] = (summary.get("val") or {}).get("average_recall")
    out["zeroshot_retention"] = summary.get("zeroshot_retention")
    if summary.get("strategy") == "joint" and None not in last:  # one phase over every domain
        out["average_recall"] = out["plasticity"] = sum(last) / len(last)
    return out


def format_comparison(summary: dict[str, Any], reference: dict[str, Any], source: str) -> str:
    """This run beside a reference run on the same stream (mean recall, %)."""
    rows = [(f"this run ({summary.get('strategy')})", headline(summary)),
            (f"reference ({reference.get('strategy')})", headline(reference))]
    sets = summary["eval_sets"]
    head = ["", f"{sets[0]} after its phase", "final " + " / ".join(sets), "average", "plasticity", "forgetting"]
    lines = [f"compared with {source}" + (f" ({reference['source']})" if reference.get("source") else "") + ":"]
    table = [head] + [[name, _fmt(h["first_learned"]), " / ".join(_fmt(x) for x in h["last_recall"] or []),
                       _fmt(h["average_recall"]), _fmt(h["plasticity"]), _fmt(h["forgetting"])]
                      for name, h in rows]
    widths = [max(len(r[j]) for r in table) for j in range(len(head))]
    lines += ["  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
              for r in table]
    return "\n".join(lines)
def _table(title: str, columns: list[str], phases: list[str], rows: list[list[Any]], initial: list[Any] | None) -> list[str]:
    """A phase x set table: rows = after phase (the initial model first), cells right-aligned."""
    all_rows = ([("initial", initial)] if initial else []) + list(zip(phases, rows))
    cells = [[v if isinstance(v, str) else _fmt(v) for v in row] for _, row in all_rows]
    width = max(10, *(len(c) + 2 for c in columns), *(len(v) + 2 for row in cells for v in row))
    lines = [title, " " * 12 + "".join(f"{c:>{width}}" for c in columns)]
    lines += [f"{name[:11]:<12}" + "".join(f"{v:>{width}}" for v in row) for (name, _), row in zip(all_rows, cells)]
    return lines


def _fmt(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _plain(v: Any) -> Any:
    """numpy / torch scalars and arrays to JSON-ready Python values."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=_plain) + "\n")

"""Phase-end evaluation (main process only): retrieval on every eval set, spatial disorder
of a fixed probe against the previous and the initial model, the final summary and report.

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
from modx.train.faults import fault_point


class Evaluator:
    def __init__(
        self,
        cfg: Config,
        eval_sets: list[tuple[str, str]],
        preprocess: Callable,
        tokenizer: Callable,
        run_dir: Path,
        device: torch.device,
    ):
        self.cfg = cfg
        self.eval_sets = eval_sets  # (name, urls) of every phase, in stream order
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.results = run_dir / "results.jsonl"
        self.disorder = run_dir / "disorder.jsonl"
        self.summary = run_dir / "summary.json"
        self.run_dir = run_dir
        self.probe_dir = run_dir / "checkpoints" / "probe"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, phase: int, phase_name: str, step: int) -> dict[str, dict[str, Any]]:
        """Retrieval on every eval set and SD vs the previous and the initial model;
        returns the retrieval metrics by eval set."""
        was_training = model.training
        model.eval()
        row: dict[str, dict[str, Any]] = {}
        probe: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        scored: dict[str, Any] = {}  # by URLs: phases that share an eval set embed it once
        for j, (name, urls) in enumerate(self.eval_sets):
            if urls not in scored:
                scored[urls] = self._score(model, urls)
            row[name], pairs = scored[urls]
            if pairs is not None:
                probe[name] = pairs
            _append(self.results, {
                "phase": phase, "phase_name": phase_name, "eval_set": name,
                "eval_index": j, "step": step, "metrics": row[name],
            })
            fault_point("evaluate")
        model.train(was_training)
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        torch.save(probe, self.probe_dir / f"phase{phase}.pt")
        if phase >= 0 and self.cfg.eval.probe > 0:
            self._disorder(probe, phase, phase_name)
        return row

    def _score(self, model: nn.Module, urls: str) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
        """Retrieval metrics of one eval set and its probe pairs' embeddings. Unreadable
        shards are skipped and counted (`skipped`); with none readable, only the error."""
        from modx.eval.embed import embed_dataset
        from modx.eval.retrieval import retrieval_metrics

        e = self.cfg.eval
        try:
            emb = embed_dataset(
                model, urls, preprocess=self.preprocess, tokenizer=self.tokenizer,
                batch_size=e.batch_size, workers=e.workers, device=self.device, progress=False, missing_ok=True,
            )
        except DataError as err:
            warnings.warn(f"eval set {urls} skipped: {err}", stacklevel=2)
            return {"error": str(err)}, None
        metrics = retrieval_metrics(emb.image, emb.text, emb.text_image_ids, ks=tuple(e.ks), backend=e.backend)
        metrics = {k: _plain(v) for k, v in metrics.items()}
        metrics.update(n_images=len(emb.image), n_texts=len(emb.text), skipped=emb.stats.get("skipped", 0))
        return metrics, probe_pairs(emb.image, emb.text, emb.text_image_ids, e.probe)

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

    def forget_from(self, phase: int) -> None:
        """Drop records of phases >= `phase` (a resumed run evaluates them again)."""
        for path in (self.results, self.disorder):
            if path.is_file():
                keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["phase"] < phase]
                path.write_text("".join(line + "\n" for line in keep))

    def reset(self) -> None:
        """Start a fresh run: remove the previous run's records."""
        for path in (self.results, self.disorder, self.summary):
            path.unlink(missing_ok=True)

    def finish(self, metric: str = "mean_recall", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json (continual metrics of the recall matrix, plus `extra`, e.g. the
        training's skipped_steps and cost), the report; print them."""
        from modx.eval.continual import continual_metrics, recall_matrix

        records = [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]
        matrix = recall_matrix(records, metric=metric)
        summary = continual_metrics(matrix.values, matrix.initial)
        summary.update(
            metric=metric, strategy=self.cfg.strategy.name, phases=matrix.phases,
            eval_sets=matrix.eval_sets, matrix=matrix.values, initial=matrix.initial,
            disorder=disorder_summary(self.disorder), **(extra or {}),
        )
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
    """The recall matrix, forgetting and an SD summary as plain text."""
    sets, metric = summary["eval_sets"], summary["metric"]
    width = max(10, *(len(s) + 2 for s in sets))
    lines = [f"recall matrix ({metric}, %): rows = after phase, columns = eval set"]
    lines.append(" " * 12 + "".join(f"{s:>{width}}" for s in sets))
    rows = ([("initial", summary["initial"])] if summary["initial"] else []) + list(zip(summary["phases"], summary["matrix"]))
    for name, row in rows:
        lines.append(f"{name[:11]:<12}" + "".join(f"{_fmt(v):>{width}}" for v in row))
    lines.append(
        f"average {_fmt(summary['average_recall'])}  forgetting {_fmt(summary['forgetting'])}  "
        f"backward transfer {_fmt(summary['backward_transfer'])}  forward transfer {_fmt(summary['forward_transfer'])}"
    )
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


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """What a comparison of runs reads from a summary.json: the strategy, the continual
    metrics, plasticity (mean recall on each domain right after its phase) and the first
    domain's recall right after its phase and at the end."""
    learned = [x for x in summary.get("learned_recall") or [] if x is not None]
    last = summary.get("last_recall") or [None]
    out = {k: summary.get(k) for k in ("strategy", "average_recall", "forgetting", "backward_transfer",
                                       "forward_transfer", "last_recall", "learned_recall")}
    out["plasticity"] = sum(learned) / len(learned) if learned else None
    out["first_learned"] = learned[0] if learned else None
    out["first_last"] = last[0]
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

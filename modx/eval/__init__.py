"""Evaluation: embeddings, retrieval, continual metrics, spatial disorder, reports.

``retrieval_metrics``, ``zeroshot_metrics``, ``continual_metrics``,
``zeroshot_retention`` and ``spatial_disorder`` are pure functions on embeddings / numbers; ``embed_dataset`` (needs modx.data) and
``write_report`` (needs matplotlib) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from modx.eval.continual import continual_metrics, recall_matrix, zeroshot_retention
from modx.eval.disorder import spatial_disorder
from modx.eval.retrieval import retrieval_metrics
from modx.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier, zeroshot_metrics

__all__ = [
    "continual_metrics",
    "embed_dataset",
    "evaluate_zeroshot",
    "recall_matrix",
    "retrieval_metrics",
    "spatial_disorder",
    "write_report",
    "zeroshot_classifier",
    "zeroshot_metrics",
    "zeroshot_retention",
]


def __getattr__(name: str) -> Any:
    if name == "embed_dataset":
        from modx.eval.embed import embed_dataset

        return embed_dataset
    if name == "write_report":
        from modx.eval.report import write_report

        return write_report
    raise AttributeError(f"module 'modx.eval' has no attribute {name!r}")

"""Streaming image-text data: WebDataset shards in, per-rank batches out.

See docs/data.md. Public names: make_loader, StreamLoader, SkipStats, ensure_builtin,
BUILTINS, write_shards, parse_sources, DataError; CLIP_benchmark directories:
read_benchmark, write_benchmark, ensure_builtin_zeroshot.
"""

from modx.data.benchmark import (
    BenchmarkSet,
    ensure_builtin_zeroshot,
    read_benchmark,
    write_benchmark,
)
from modx.data.builtin import BUILTINS, STREAM, ensure_builtin
from modx.data.loader import StreamLoader, dist_info, make_loader
from modx.data.stats import REASONS, SkipStats
from modx.data.urls import DataError, Source, parse_sources, shard_sizes
from modx.data.writer import write_shards

__all__ = [
    "BUILTINS",
    "BenchmarkSet",
    "REASONS",
    "STREAM",
    "DataError",
    "SkipStats",
    "Source",
    "StreamLoader",
    "dist_info",
    "ensure_builtin",
    "ensure_builtin_zeroshot",
    "make_loader",
    "parse_sources",
    "read_benchmark",
    "shard_sizes",
    "write_benchmark",
    "write_shards",
]

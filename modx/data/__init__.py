"""Streaming image-text data: WebDataset shards in, per-rank batches out.

See docs/data.md. Public names: make_loader, StreamLoader, SkipStats, ensure_builtin,
BUILTINS, write_shards, parse_sources, DataError.
"""

from modx.data.builtin import BUILTINS, STREAM, ensure_builtin
from modx.data.loader import StreamLoader, dist_info, make_loader
from modx.data.stats import REASONS, SkipStats
from modx.data.urls import DataError, Source, parse_sources, shard_sizes
from modx.data.writer import write_shards

__all__ = [
    "BUILTINS",
    "REASONS",
    "STREAM",
    "DataError",
    "SkipStats",
    "Source",
    "StreamLoader",
    "dist_info",
    "ensure_builtin",
    "make_loader",
    "parse_sources",
    "shard_sizes",
    "write_shards",
]

"""Work shared out to Python threads that each run torch with one intra-op thread.

For work made of many small ops (copies, FFTs and elementwise passes over a few MB; numpy
comparisons) torch's own threads gain little: each op pays OpenMP's fork / join. Whole
shares of the work side by side, one per core, scale instead (BENCHMARKS.md, "S4D speed"
and "Retrieval"). Used by the fused S4D Function and the one-pass retrieval.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

MAX_THREADS = 64  # the pool's size; a call uses one thread per share
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="modx")
    return _POOL


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts its own pool."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def map_one_thread_each(fn: Callable[[T], R], shares: Sequence[T]) -> list[R]:
    """[fn(share) for share in shares], each share on its own thread of a per-process pool
    with one torch thread and autograd recording off; one share runs inline, as it is.
    torch's thread count (global to torch) is restored afterwards."""
    if len(shares) > MAX_THREADS:
        raise ValueError(f"{len(shares)} shares > {MAX_THREADS} threads")
    if len(shares) == 1:
        return [fn(shares[0])]
    threads = torch.get_num_threads()

    def run(share: T) -> R:
        torch.set_num_threads(1)  # this thread's ops; the other threads run the other shares
        with torch.no_grad():
            return fn(share)

    try:
        return list(_pool().map(run, shares))
    finally:
        torch.set_num_threads(threads)

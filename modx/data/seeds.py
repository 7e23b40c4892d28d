"""One way to derive seeds: a 63-bit hash of a tuple of integers and strings.

Seeds built from several parts (train.seed, a global step, a rank, a worker, a purpose)
with arithmetic such as ``seed + rank`` collide: seed 0 on rank 1 equals seed 1 on rank 0.
A hash of the whole tuple does not (up to 2^-63), and is the same in every process and
Python run (unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings, the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def preserved_rng() -> Iterator[None]:
    """The global torch (CPU), random and numpy RNG states are restored on leaving: what
    runs inside leaves the caller's random streams where they were."""
    import numpy as np
    import torch

    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])

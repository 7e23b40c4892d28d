"""One way to derive seeds: a 63-bit hash of a tuple of integers and strings.

Seeds built from several parts (train.seed, a global step, a rank, a worker, a purpose)
with arithmetic such as ``seed + rank`` collide: seed 0 on rank 1 equals seed 1 on rank 0.
A hash of the whole tuple does not (up to 2^-63), and is the same in every process and
Python run (unlike ``hash()``).
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings, the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

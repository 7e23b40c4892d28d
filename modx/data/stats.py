"""Counts of delivered and skipped samples, by reason."""

from __future__ import annotations

from collections import Counter

# Reasons a sample (or a whole shard, for the first two) is skipped.
REASONS = (
    "open_error",  # the shard could not be opened (missing file, failing pipe: command)
    "truncated_tar",  # the tar stream broke off; samples before the break are kept
    "duplicate_key",  # a key seen before in the same shard (eval: in the same pass)
    "missing_image",  # no .jpg/.jpeg/.png/.webp member
    "bad_image",  # the image bytes do not decode (or the transform failed on them)
    "missing_caption",  # neither .json "captions" nor .txt
    "empty_caption",  # captions present but blank
    "missing_label",  # a classification set's sample without .cls
    "bad_label",  # .cls is not a non-negative integer
)


class SkipStats:
    """Delivered-sample count and skip counts by reason; merged across worker processes."""

    def __init__(self) -> None:
        self.samples = 0
        self.reasons: Counter[str] = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] += n

    def update(self, other: dict) -> None:
        """Add the counts of an ``as_dict()`` result (e.g. a delta from a worker)."""
        self.samples += int(other.get("samples", 0))
        for reason, n in other.get("reasons", {}).items():
            self.reasons[reason] += int(n)

    def take(self) -> dict:
        """Return the counts so far and reset them (a worker's delta to ship with a batch)."""
        out = self.as_dict()
        self.samples = 0
        self.reasons.clear()
        return out

    def as_dict(self) -> dict:
        return {"samples": self.samples, "skipped": self.skipped, "reasons": dict(self.reasons)}

    def __repr__(self) -> str:
        return f"SkipStats({self.as_dict()})"

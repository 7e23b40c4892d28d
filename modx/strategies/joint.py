"""Joint training: one pass over every phase's data mixed together (the upper bound).

The loop merges the stream into a single phase whose training URLs join every phase's
with `::` and whose budget is the sum of theirs; evaluation still covers every eval set.
"""

from modx.strategies.base import Strategy


class Joint(Strategy):
    name = "joint"
    joint = True

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0  # one phase over all the data

"""Experience replay: earlier phases' samples in every batch (modx.data.replay).

Composable with every strategy (`strategy.replay.ratio` > 0: that share of the GLOBAL batch
is replayed, from the stream of earlier phases' shards or from a buffer of encoded samples,
`strategy.replay.source`); `strategy.name: replay` is fine-tuning with replay at ratio 0.5
unless set. The loader builds the mixed batches; the loop keeps the buffer
(modx.train.replay).
"""

from __future__ import annotations

from modx.strategies.base import Strategy


class Replay(Strategy):
    name = "replay"
    default_replay_ratio = 0.5

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0 if cfg.replay.data else 1  # nothing earlier to replay during phase 0, unless replay.data

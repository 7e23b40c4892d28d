"""WiSE-FT-style weight interpolation (Wortsman et al., 2022) at every phase end:
theta <- (1 - a) * theta_old + a * theta_new, a = `strategy.wiseft_alpha`, theta_old the
model that ended the previous phase. The first phase has no old model and is kept as is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modx.strategies.base import Batch, Strategy, local


class WiseFT(Strategy):
    name = "wiseft"

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 0 if align_initial else 1  # phase 0 ends without an old model to mix with

    def end_phase(
        self, phase: int, model: nn.Module, old_model: nn.Module | None, batches: Iterable[Batch]
    ) -> None:
        if old_model is None:
            return
        a = self.cfg.wiseft_alpha
        new_state = self.accelerator.unwrap_model(model).state_dict()
        old_state = old_model.state_dict()
        with torch.no_grad():  # elementwise: on this process's shards when the model is sharded (FSDP)
            for name, value in new_state.items():
                if value.is_floating_point():
                    mine = local(value)
                    mine.copy_((1 - a) * local(old_state[name]).to(mine) + a * mine)

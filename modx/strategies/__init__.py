"""Continual strategies: one interface (base.Strategy), one small module each, by name."""

from __future__ import annotations

from accelerate import Accelerator

from modx.config import StrategyConfig
from modx.strategies.base import Strategy
from modx.strategies.cclip import CCLIP
from modx.strategies.cmcl import CMCL
from modx.strategies.ctp import CTP
from modx.strategies.ewc import EWC
from modx.strategies.finetune import Finetune
from modx.strategies.joint import Joint
from modx.strategies.modx import Distill, ModX
from modx.strategies.replay import Replay
from modx.strategies.wiseft import WiseFT
from modx.strategies.zscl import ZSCL

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Finetune, ModX, Distill, EWC, Replay, WiseFT, Joint, ZSCL, CTP, CCLIP, CMCL)
}


def build_strategy(cfg: StrategyConfig, accelerator: Accelerator, local_loss: bool = True) -> Strategy:
    """The strategy `cfg.name`; `local_loss` is train.local_loss (see modx.losses)."""
    return STRATEGIES[cfg.name](cfg, accelerator, local_loss=local_loss)


def replay_ratio(cfg: StrategyConfig) -> float:
    """The replay share of each batch: strategy.replay.ratio, else the strategy's default."""
    if cfg.replay.ratio is not None:
        return cfg.replay.ratio
    return STRATEGIES[cfg.name].default_replay_ratio


__all__ = ["STRATEGIES", "Strategy", "build_strategy", "replay_ratio"]

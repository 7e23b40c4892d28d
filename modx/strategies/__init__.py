"""Continual strategies: one interface (base.Strategy), one small module each, by name.

The registry validates its own names (`validate_strategy`): modx.config sits below the
strategies and never imports them."""

from __future__ import annotations

from accelerate import Accelerator

from modx.config import ConfigError, StrategyConfig
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


def validate_strategy(cfg: StrategyConfig) -> None:
    """Raise ConfigError at strategy.name unless it names a registered strategy."""
    if cfg.name not in STRATEGIES:
        raise ConfigError("strategy.name", f"unknown strategy {cfg.name!r}; choose one of {sorted(STRATEGIES)}")


def build_strategy(cfg: StrategyConfig, accelerator: Accelerator, local_loss: bool = True) -> Strategy:
    """The strategy `cfg.name`; `local_loss` is train.local_loss (see modx.losses)."""
    validate_strategy(cfg)
    return STRATEGIES[cfg.name](cfg, accelerator, local_loss=local_loss)


def replay_ratio(cfg: StrategyConfig) -> float:
    """The replay share of each batch: strategy.replay.ratio, else the strategy's default."""
    if cfg.replay.ratio is not None:
        return cfg.replay.ratio
    validate_strategy(cfg)
    return STRATEGIES[cfg.name].default_replay_ratio


__all__ = ["STRATEGIES", "Strategy", "build_strategy", "replay_ratio", "validate_strategy"]

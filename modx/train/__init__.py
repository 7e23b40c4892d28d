"""The continual training engine (Accelerate): `run(cfg)` trains a config's stream."""

from modx.train.loop import run

__all__ = ["run"]

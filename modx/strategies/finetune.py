"""CLIP_ct: plain continual fine-tuning with the contrastive loss (the lower bound)."""

from modx.strategies.base import Strategy


class Finetune(Strategy):
    name = "finetune"

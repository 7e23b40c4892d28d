"""Experience replay: a bounded buffer of earlier phases' samples mixed into each batch.

Composable with every strategy (`strategy.replay.ratio` > 0); `strategy.name: replay` is
fine-tuning with replay at ratio 0.5 unless set. Each process keeps its own reservoir
(uniform over every sample it has seen, capacity `replay.size / num_processes`); a batch
of b samples keeps its first b - round(ratio * b) fresh samples and fills the rest with
buffered samples from EARLIER phases (none during the first phase). Samples are stored
preprocessed on the CPU: memory = size x (image + tokens) bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from modx.models.text import PAD_ID, used_width
from modx.strategies.base import Batch, Strategy

REPLAY_KEY = "replay"  # the key of a replayed sample in a mixed batch


class Replay(Strategy):
    name = "replay"
    default_replay_ratio = 0.5

    @classmethod
    def plain_phases(cls, cfg, align_initial: bool) -> int | None:
        return 1  # no earlier phase to replay yet (the shared run keeps a buffer for it)


class ReplayBuffer:
    def __init__(self, capacity: int, ratio: float, seed: int = 0):
        self.capacity = capacity
        self.ratio = ratio
        self.generator = torch.Generator().manual_seed(seed)
        self.image: torch.Tensor | None = None  # (capacity, 3, H, W)
        self.text: torch.Tensor | None = None  # (capacity, ctx)
        self.phase = torch.full((capacity,), -1, dtype=torch.long)  # -1: empty slot
        self.ids = torch.full((capacity,), -1, dtype=torch.long)  # each stored sample's index in the stream
        self.seen = 0

    def mix(self, batch: Batch, phase: int) -> Batch:
        """Replace the last round(ratio * b) samples of `batch` by earlier phases' samples.
        Their "key" is REPLAY_KEY and "replay_id" names each stored sample (unique in this
        process's stream; -1 for the fresh samples): a stored sample is the same
        preprocessed tensor every time it comes back (Mod-X caches its old features)."""
        earlier = torch.nonzero((self.phase >= 0) & (self.phase < phase)).flatten()
        b = batch["image"].shape[0]
        n = min(round(self.ratio * b), b - 1) if len(earlier) else 0
        if n == 0:
            return batch
        pick = earlier[torch.randint(len(earlier), (n,), generator=self.generator)]
        device = batch["image"].device
        # Text batches may be cut to their longest caption (train.trim_padding): the mixed
        # batch is as wide as the widest of the fresh and the replayed captions.
        replayed = self.text[pick]
        width = max(batch["text"].shape[1], used_width(replayed))
        return {
            "image": torch.cat([batch["image"][: b - n], self.image[pick].to(device)]),
            "text": torch.cat([_fit(batch["text"][: b - n], width), _fit(replayed, width).to(device)]),
            "key": list(batch.get("key", [""] * b))[: b - n] + [REPLAY_KEY] * n,
            "replay_id": [-1] * (b - n) + self.ids[pick].tolist(),
        }

    def add(self, batch: Batch, phase: int) -> None:
        """Reservoir sampling: every sample seen so far is in the buffer with equal probability."""
        image, text = batch["image"].detach().cpu(), batch["text"].detach().cpu()
        if self.image is None:
            self.image = torch.zeros((self.capacity, *image.shape[1:]), dtype=image.dtype)
            self.text = torch.zeros((self.capacity, *text.shape[1:]), dtype=text.dtype)
        if text.shape[1] > self.text.shape[1]:  # a wider text batch than any before: widen the buffer
            self.text = _fit(self.text, text.shape[1])
        text = _fit(text, self.text.shape[1])
        for i in range(image.shape[0]):
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(torch.randint(self.seen + 1, (1,), generator=self.generator))
            if slot < self.capacity:
                self.image[slot], self.text[slot], self.phase[slot] = image[i], text[i], phase
                self.ids[slot] = self.seen
            self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "text": self.text,
            "phase": self.phase,
            "ids": self.ids,
            "seen": self.seen,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.image, self.text, self.phase = state["image"], state["text"], state["phase"]
        self.seen = state["seen"]
        # (checkpoints before replay ids: the slots get ids no stream index can take)
        self.ids = state.get("ids", torch.where(self.phase >= 0, -2 - torch.arange(len(self.phase)), -1))
        self.generator.set_state(state["generator"])


def _fit(text: torch.Tensor, width: int) -> torch.Tensor:
    """`text` (B, L) padded with token 0, or cut, to `width` columns (only padding is cut)."""
    if text.shape[1] >= width:
        return text[:, :width]
    return torch.nn.functional.pad(text, (0, width - text.shape[1]), value=PAD_ID)

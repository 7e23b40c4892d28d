"""Trimming text padding: a batch of captions runs at the length of its longest caption.

CLIP tokenizers pad every caption to the context length (77 for OpenAI's CLIP) with
token 0, and most captions are far shorter. For a text tower that is causal (each token
sees only the tokens before it), adds absolute positional embeddings and pools at the
end-of-text token (open_clip's `argmax`/`eos` pooling) or at the first token, the
padding after a caption's last token cannot change its features: cutting the columns
that are padding in every caption of the batch gives the same features (to float
rounding) for less work. `trims_padding` says whether a model's text tower is such a
tower; the training loop trims its batches only then (`train.trim_padding`).

open_clip's `CLIP.encode_text` adds the full positional table and the full causal mask,
and its `TextTransformer` the full causal mask, so both refuse a shorter batch;
`allow_short_text` gives such a model methods that slice them to the batch's length (the
same computation otherwise). modx's SSM text towers slice them already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from modx.models.pooled import _clip_encode_text, bind, bound, clip_text_embeds, project_text
from modx.models.towers import SSMTextTower

PAD_ID = 0  # open_clip's SimpleTokenizer pads with token 0
_POOLS = ("argmax", "eos", "first")  # pooling positions a causal tower fixes before any padding


def trims_padding(model: nn.Module) -> bool:
    """Whether cutting trailing all-padding columns from a text batch leaves `model`'s text
    features unchanged (a causal tower with absolute positions, pooling at the end-of-text
    or first token, no appended class token, padding id 0)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, CLIP):
        return (
            getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "argmax") in _POOLS
            and _short_text_encoder(model)
        )
    tower = getattr(model, "text", None)
    if isinstance(tower, SSMTextTower):
        return tower.pool_type in _POOLS
    if isinstance(tower, TextTransformer):
        return (
            bound(tower, "_embeds", _sliced_embeds)
            and tower.attn_mask is not None
            and tower.cls_emb is None
            and not tower.use_pad_mask
            and tower.pool_type in _POOLS
            and getattr(tower, "pad_id", PAD_ID) == PAD_ID
        )
    return False


def allow_short_text(model: nn.Module) -> nn.Module:
    """Let an open_clip `CLIP` encode a batch shorter than its context length (in place)."""
    if isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None:
        bind(model, "encode_text", _sliced_encode_text)
    tower = getattr(model, "text", None)
    if isinstance(tower, TextTransformer) and tower.attn_mask is not None:
        bind(tower, "_embeds", _sliced_embeds)
    return model


def _short_text_encoder(model: CLIP) -> bool:
    """Does `model.encode_text` take a batch shorter than the context length?"""
    return bound(model, "encode_text", _sliced_encode_text) or bound(model, "encode_text", _clip_encode_text)


def _sliced_embeds(self: TextTransformer, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """open_clip's `TextTransformer._embeds` with the causal mask cut to the batch's length."""
    x, mask = TextTransformer._embeds(self, text)
    if mask is not None and mask.dim() == 2 and mask.shape[-1] != x.shape[1]:
        mask = mask[: x.shape[1], : x.shape[1]]
    return x, mask


def _sliced_encode_text(self: CLIP, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` with the positional table and causal mask cut to the
    batch's length (identical at the full length)."""
    n = text.shape[1]
    x = self.transformer(clip_text_embeds(self, text), attn_mask=self.attn_mask[:n, :n])  # (B, n, W)
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    x = project_text(self.text_projection, x)
    return F.normalize(x, dim=-1) if normalize else x


def trim_padding(text: torch.Tensor) -> torch.Tensor:
    """`text` (B, L) without the trailing columns that are padding in every row (at least
    one column is kept). Meant for CPU batches: on an accelerator it reads the length back."""
    n = used_width(text)
    return text if n == text.shape[1] else text[:, :n].contiguous()


def used_width(text: torch.Tensor) -> int:
    """Columns of `text` (B, L) up to the last non-padding token of any row (at least 1)."""
    used = (text != PAD_ID).any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else 1

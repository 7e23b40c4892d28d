"""The last transformer block at the pooled token only.

A CLIP tower that pools one token - the class token of open_clip's `VisionTransformer`
(`pool_type='tok'`), the end-of-text (or first) token of a causal text transformer - reads
nothing of the last block's output but that token's row. Every other row of the last
block (its query projection, attention output, residual and MLP) is work for nothing:
a quarter of a 4-layer tower. `pool_last_block(model)` gives such towers a forward that
runs the last block for the pooled row only, with the keys and values of every row (and,
for a causal tower, the causal mask of that row as a key mask): the same features and
gradients, to float rounding. Only open_clip's plain `ResidualAttentionBlock` is
handled; any other block, attentional pooling, average pooling or `output_tokens` keeps
open_clip's own forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import (
    ResidualAttentionBlock,
    TextTransformer,
    Transformer,
    VisionTransformer,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

_TEXT_POOLS = ("argmax", "eos", "first")


def pool_last_block(model: nn.Module) -> nn.Module:
    """Give `model`'s eligible towers the pooled-row last block (in place); returns it."""
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer) and _vision_eligible(visual):
        bind(visual, "forward", _vision_forward)
    if isinstance(model, CLIP) and _text_eligible(model, model.text_pool_type):
        bind(model, "encode_text", _clip_encode_text)
    tower = getattr(model, "text", None)
    if isinstance(tower, TextTransformer) and tower.cls_emb is None and _text_eligible(tower, tower.pool_type):
        bind(tower, "forward", _text_tower_forward)
    return model


def pools_last_block(model: nn.Module) -> dict[str, bool]:
    """Which towers of `model` run their last block at the pooled row only."""
    model = getattr(model, "module", model)
    tower = getattr(model, "text", None)
    text = bound(model, "encode_text", _clip_encode_text) or bound(tower, "forward", _text_tower_forward)
    return {"vision": bound(getattr(model, "visual", None), "forward", _vision_forward), "text": text}


def bind(obj: nn.Module, name: str, func: Callable) -> None:
    """obj.name = func bound to obj, for this instance only. A `partial`, not a bound
    method: it pickles by reference to `func` (torch.save of a whole model loads back) and
    deepcopy binds the copy (the old model of Mod-X)."""
    setattr(obj, name, functools.partial(func, obj))


def bound(obj: object, name: str, func: Callable) -> bool:
    """Is obj.name `func` bound by `bind`?"""
    method = obj.__dict__.get(name) if isinstance(obj, nn.Module) else None
    return isinstance(method, functools.partial) and method.func is func and method.args[0] is obj


def _plain_stack(transformer: object) -> bool:
    return (
        isinstance(transformer, Transformer)
        and transformer.batch_first
        and len(transformer.resblocks) > 0
        and type(transformer.resblocks[-1]) is ResidualAttentionBlock
        and not hasattr(transformer.resblocks[-1], "ln_1_kv")
    )


def _vision_eligible(visual: VisionTransformer) -> bool:
    return visual.pool_type == "tok" and visual.attn_pool is None and _plain_stack(visual.transformer)


def _text_eligible(owner: nn.Module, pool_type: str) -> bool:
    return (
        pool_type in _TEXT_POOLS
        and getattr(owner, "attn_mask", None) is not None  # causal
        and _plain_stack(owner.transformer)
    )


def _all_but_last(transformer: Transformer, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's Transformer.forward (batch first) without its last block."""
    for block in transformer.resblocks[:-1]:
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    return x


def last_block_at(block: ResidualAttentionBlock, x: torch.Tensor, at: torch.Tensor, causal: bool) -> torch.Tensor:
    """`block`(x)[b, at[b]] for every b, (B, W), computing only those rows: each row's query
    against the keys and values of all rows of x (B, L, W) (of rows <= at[b] if causal)."""
    rows = torch.arange(x.shape[0], device=x.device)
    h = block.ln_1(x)
    query = h[rows, at].unsqueeze(1)  # (B, 1, W)
    hidden = None
    if causal:  # the causal mask's row at[b] is a key mask of sample b
        hidden = torch.arange(x.shape[1], device=x.device)[None, :] > at[:, None]  # (B, L), True: not seen
    a = block.attn(query, h, h, need_weights=False, key_padding_mask=hidden)[0]  # (B, 1, W)
    y = x[rows, at].unsqueeze(1) + block.ls_1(a)
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y[:, 0]


def _vision_forward(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer.forward, its last block at the class token only."""
    if self.output_tokens:
        return VisionTransformer.forward(self, x)
    x = self._embeds(x)
    x = _all_but_last(self.transformer, x, None)
    at = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    x = last_block_at(self.transformer.resblocks[-1], x, at, causal=False).unsqueeze(1)  # (B, 1, W)
    pooled, _ = self._pool(x)  # the class token, ln_post before or after: one row either way
    return pooled @ self.proj if self.proj is not None else pooled


def _pool_index(text: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """The row text_global_pool reads: argmax token, first EOS, or 0."""
    if pool_type == "argmax":
        return text.argmax(dim=-1)
    if pool_type == "eos":
        return (text == eos_id).int().argmax(dim=-1)
    return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)


def _text_rows(owner: nn.Module, x: torch.Tensor, text: torch.Tensor, pool_type: str, eos_id: int | None):
    """Blocks but the last over x (B, L, W) (causal mask cut to L), then the last block at
    the pooled row: (B, W), before ln_final."""
    n = x.shape[1]
    x = _all_but_last(owner.transformer, x, owner.attn_mask[:n, :n])
    at = _pool_index(text, pool_type, eos_id)
    return last_block_at(owner.transformer.resblocks[-1], x, at, causal=True)


def _clip_encode_text(self: CLIP, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's CLIP.encode_text at the batch's length (a batch cut to its longest caption
    is fine: modx.models.text), its last block at the pooled row."""
    x = self.ln_final(_text_rows(self, clip_text_embeds(self, text), text, self.text_pool_type,
                                 getattr(self, "text_eos_id", None)))
    x = project_text(self.text_projection, x)
    return F.normalize(x, dim=-1) if normalize else x


def clip_text_embeds(self: CLIP, text: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text's token + positional embeddings, at the batch's length (B, n, W)."""
    cast_dtype = self.transformer.get_cast_dtype()
    n = text.shape[1]
    return self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)


def project_text(projection: nn.Linear | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """open_clip's text projection: a Linear, a (W, D) matrix, or none."""
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _text_tower_forward(self: TextTransformer, text: torch.Tensor) -> torch.Tensor:
    """open_clip's TextTransformer.forward (no class token), its last block at the pooled row."""
    if self.output_tokens:
        return TextTransformer.forward(self, text)
    x, _ = TextTransformer._embeds(self, text)
    pooled = self.ln_final(_text_rows(self, x, text, self.pool_type, getattr(self, "eos_id", None)))
    return project_text(self.text_projection, pooled)


__all__ = ["last_block_at", "pool_last_block", "pools_last_block"]

"""Text and vision towers whose sequence backbone is made of diagonal-SSM blocks.

They follow open_clip's tower conventions so that open_clip's `CustomTextCLIP`
(`encode_image`, `encode_text`, `set_grad_checkpointing`, `lock_*`) drives them
unchanged: a text tower maps token ids (B, ctx) to (B, embed_dim) with EOT
pooling and a `text_projection`; a vision tower maps images (B, 3, H, W) to
(B, embed_dim) through a patch embedding, `ln_post` and `proj`.

A backbone is a string: ``"s4d"`` or ``"s5"`` (every layer that SSM), or a layer
pattern over ``S`` (an SSM block of kind ``ssm_layer``) and ``A`` (an open_clip
attention block), e.g. ``"SSAS"``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from open_clip.transformer import LayerNorm, LayerScale, ResidualAttentionBlock, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from modx.models.ssm import S4D, S5

SSM_LAYERS: dict[str, Callable[..., nn.Module]] = {"s4d": S4D, "s5": S5}
SSM_KINDS = tuple(SSM_LAYERS)


def parse_backbone(backbone: str, layers: int | None, ssm_layer: str) -> list[str]:
    """Per-layer kinds ("s4d", "s5" or "attn") of a backbone string.

    ``"s4d"`` / ``"s5"`` repeat that SSM ``layers`` times; a pattern over ``S``/``A``
    (``"SSAS"``) gives one layer a letter, ``S`` being an SSM of kind ``ssm_layer``.
    """
    if backbone in SSM_KINDS:
        return [backbone] * (12 if layers is None else layers)
    if ssm_layer not in SSM_KINDS:
        raise ValueError(f"ssm_layer must be one of {SSM_KINDS}, got {ssm_layer!r}")
    if not backbone or set(backbone) - {"S", "A"}:
        raise ValueError(
            f"backbone {backbone!r} is neither 'transformer', one of {SSM_KINDS}, nor a layer "
            "pattern over 'S' (SSM) and 'A' (attention) such as 'SSAS'"
        )
    if layers is not None and layers != len(backbone):
        raise ValueError(f"layers={layers} disagrees with backbone pattern {backbone!r}")
    return ["attn" if c == "A" else ssm_layer for c in backbone]


@dataclass
class SSMTowerCfg:
    """Fields shared by both SSM towers (JSON keys of a tower config)."""

    backbone: str = "s4d"
    width: int = 512
    layers: int | None = None  # default 12; a pattern gives one layer per letter
    heads: int = 8  # attention layers of a hybrid pattern
    mlp_ratio: float = 4.0  # 0 disables the MLP after each sequence mixer
    ssm_layer: str = "s4d"  # the SSM behind 'S' in a hybrid pattern
    ssm: dict = field(default_factory=dict)  # keyword arguments of the SSM layer
    ls_init_value: float | None = None

    @classmethod
    def from_dict(cls, cfg: dict, where: str):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**cfg)


@dataclass
class SSMTextCfg(SSMTowerCfg):
    context_length: int = 77
    vocab_size: int = 49408
    pos_embed: bool = False  # a causal SSM already knows positions
    pool_type: str = "argmax"  # open_clip's EOT pooling (EOT has the largest CLIP token id)
    eos_id: int = 2  # only for pool_type 'eos'


@dataclass
class SSMVisionCfg(SSMTowerCfg):
    image_size: int | list[int] = 224
    patch_size: int = 16
    bidirectional: bool = True
    pool_type: str = "avg"  # 'avg' over patches, or 'tok' (class token, needs bidirectional)
    pos_embed: bool = True


class SSMBlock(nn.Module):
    """Pre-norm residual block: x + SSM(LN(x)), then x + MLP(LN(x)).  (B, L, H) -> (B, L, H)."""

    def __init__(self, width: int, ssm: nn.Module, mlp_ratio: float, ls_init_value: float | None):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.ssm = ssm
        # The SSM layer's tags (`_modx_ssm`, `_modx_ssm_lr`) live on the Parameter objects,
        # which copy.deepcopy does not preserve; this record (names -> lr) survives copies.
        self.ssm_param_lrs = {f"ssm.{n}": getattr(p, "_modx_ssm_lr", None)
                              for n, p in ssm.named_parameters() if getattr(p, "_modx_ssm", False)}
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.mlp = None
        if mlp_ratio > 0:
            hidden = int(width * mlp_ratio)
            self.ln_2 = LayerNorm(width)
            self.mlp = nn.Sequential(OrderedDict([
                ("c_fc", nn.Linear(width, hidden)),
                ("gelu", nn.GELU()),
                ("c_proj", nn.Linear(hidden, width)),
            ]))
            self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.ssm(self.ln_1(x)))  # (B, L, H)
        if self.mlp is not None:
            x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x


class SequenceBackbone(nn.Module):
    """A stack of SSM and attention blocks over (B, L, H) sequences."""

    def __init__(self, cfg: SSMTowerCfg, bidirectional: bool):
        super().__init__()
        self.width = cfg.width
        self.kinds = parse_backbone(cfg.backbone, cfg.layers, cfg.ssm_layer)
        self.layers = len(self.kinds)
        self.grad_checkpointing = False
        blocks = []
        for kind in self.kinds:
            if kind == "attn":
                blocks.append(ResidualAttentionBlock(
                    cfg.width, cfg.heads, cfg.mlp_ratio or 4.0, ls_init_value=cfg.ls_init_value))
            else:
                ssm = SSM_LAYERS[kind](cfg.width, bidirectional=bidirectional, **cfg.ssm)
                blocks.append(SSMBlock(cfg.width, ssm, cfg.mlp_ratio, cfg.ls_init_value))
        self.resblocks = nn.ModuleList(blocks)
        self._init_attention()

    def _init_attention(self) -> None:
        # open_clip's TextTransformer init for attention blocks and MLPs.
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            if isinstance(block, ResidualAttentionBlock):
                nn.init.normal_(block.attn.in_proj_weight, std=self.width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            if getattr(block, "mlp", None) is not None:
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].ln_1.weight.dtype

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:  # (B, L, H) -> (B, L, H)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return x


class SSMTextTower(nn.Module):
    """Causal SSM text encoder: CLIP tokens -> (B, embed_dim), EOT pooling as in open_clip."""

    output_tokens: bool = False

    def __init__(self, embed_dim: int, cfg: SSMTextCfg):
        super().__init__()
        self.context_length = self.num_pos = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.width = cfg.width
        self.output_dim = embed_dim
        self.pool_type = cfg.pool_type
        self.eos_id = cfg.eos_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = (
            nn.Parameter(torch.empty(cfg.context_length, cfg.width)) if cfg.pos_embed else None)
        self.transformer = SequenceBackbone(cfg, bidirectional=False)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        # Attention layers of a hybrid stay causal so the EOT token sums up the caption.
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.init_parameters()

    def init_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if self.positional_embedding is not None:
            nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"} if self.positional_embedding is not None else set()

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the tower except its last `unlocked_layers` blocks (+ final norm and projection)."""
        for p in self.parameters():
            p.requires_grad = False
        if unlocked_layers:
            unlocked = [*self.transformer.resblocks[-unlocked_layers:], self.ln_final]
            for p in (q for m in unlocked for q in m.parameters()):
                p.requires_grad = True
            self.text_projection.requires_grad = True

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        seq_len = text.shape[1]
        x = self.token_embedding(text)  # (B, L, H)
        if self.positional_embedding is not None:
            x = x + self.positional_embedding[:seq_len].to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:seq_len, :seq_len])
        x = self.ln_final(x)
        pooled = text_global_pool(x, text, self.pool_type, eos_token_id=self.eos_id)  # (B, H)
        return pooled @ self.text_projection.to(pooled.dtype)  # (B, embed_dim)


class SSMVisionTower(nn.Module):
    """Bidirectional SSM over the raster sequence of image patches -> (B, embed_dim).

    A causal scan would let a leading class token see only itself (DESIGN.md
    pitfall), so the default is a bidirectional SSM with mean pooling over patches;
    `pool_type='tok'` (a class token) is refused for a causal backbone.
    """

    output_tokens: bool = False

    def __init__(self, embed_dim: int, cfg: SSMVisionCfg):
        super().__init__()
        if cfg.pool_type not in ("avg", "tok"):
            raise ValueError(f"vision_cfg.pool_type must be 'avg' or 'tok', got {cfg.pool_type!r}")
        if cfg.pool_type == "tok" and not cfg.bidirectional:
            raise ValueError(
                "vision_cfg: pool_type='tok' with a causal SSM lets the class token see only "
                "itself; set bidirectional=true or pool_type='avg'")
        size = cfg.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.patch_size = (cfg.patch_size, cfg.patch_size)
        self.grid_size = (self.image_size[0] // cfg.patch_size, self.image_size[1] // cfg.patch_size)
        self.width = cfg.width
        self.output_dim = embed_dim
        self.pool_type = cfg.pool_type
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        n_tokens = self.grid_size[0] * self.grid_size[1]
        self.class_embedding = None
        if cfg.pool_type == "tok":
            self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
            n_tokens += 1
        self.positional_embedding = (
            nn.Parameter(scale * torch.randn(n_tokens, cfg.width)) if cfg.pos_embed else None)
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = SequenceBackbone(cfg, bidirectional=cfg.bidirectional)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding", "class_embedding"}

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower except its last `unlocked_groups` blocks (+ final norm and projection)."""
        for p in self.parameters():
            p.requires_grad = False
        if unlocked_groups:
            unlocked = [*self.transformer.resblocks[-unlocked_groups:], self.ln_post]
            for p in (q for m in unlocked for q in m.parameters()):
                p.requires_grad = True
            self.proj.requires_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, H, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, L, H), raster order
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + L, H)
        if self.positional_embedding is not None:
            x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        pooled = x[:, 0] if self.class_embedding is not None else x.mean(dim=1)  # (B, H)
        return pooled @ self.proj.to(pooled.dtype)  # (B, embed_dim)

"""ViT-Tiny as the paper trains it, with every self-attention a registry slot."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from convnn.models.registry import LayerFactory, register_model

CLS_INITS = ("trunc_normal", "randn")


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """Fixed position table ``[1, length, dim]`` (even ``dim``): sin on even, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table[None]


class EncoderBlock(nn.Module):
    """Pre-norm block ``[B, N, D] -> [B, N, D]``: ``x + drop(slot(LN(x)))`` then ``x + drop(MLP(LN(x)))``."""

    def __init__(self, attention: nn.Module, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim)
        )
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D] -> [B, N, D]``."""
        x = x + self.dropout1(self.attention(self.norm1(x)))
        return x + self.dropout2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """``[B, C, S, S] -> [B, classes]``: patch projection + LayerNorm, learnable cls token, fixed sinusoidal
    positions, ``depth`` pre-norm blocks, a linear classifier on the cls token (no final norm).

    ``cls_init``: "trunc_normal" starts the cls token at a truncated normal with std 0.02 (timm's ViT);
    "randn" at a standard normal (std 1), as the paper's reference did.
    """

    def __init__(
        self,
        layer: LayerFactory,
        num_classes: int,
        image_size: int,
        in_channels: int,
        patch_size: int,
        dim: int,
        depth: int,
        mlp_dim: int,
        dropout: float,
        cls_init: str,
    ) -> None:
        super().__init__()
        self.patch_projection = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        tokens = (image_size // patch_size) ** 2 + 1
        self.register_buffer("position_table", sinusoidal_table(tokens, dim), persistent=False)
        self.blocks = nn.Sequential(
            *(EncoderBlock(layer(dim, dim), dim, mlp_dim, dropout) for _ in range(depth))
        )
        self.classifier = nn.Linear(dim, num_classes)
        if cls_init == "trunc_normal":
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        else:
            nn.init.normal_(self.cls_token)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, S, S] -> [B, classes]``."""
        patches = self.patch_norm(self.patch_projection(x).flatten(2).transpose(1, 2))
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return self.classifier(self.blocks(tokens + self.position_table)[:, 0])


@register_model("vit_tiny", slot_kind="tokens")
def vit_tiny(
    layer: LayerFactory,
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
    patch_size: int = 16,
    dim: int = 192,
    depth: int = 12,
    mlp_dim: int = 768,
    dropout: float = 0.1,
    cls_init: str = "trunc_normal",
) -> VisionTransformer:
    """The paper's ViT-Tiny: 12 blocks, width 192, MLP 768, patch 16 (heads and attention dropout are options
    of the attention layer); ``dropout`` is applied in the MLP and on both residual branches; ``cls_init``
    (trunc_normal | randn) initialises the cls token (see :class:`VisionTransformer`)."""
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"vit_tiny needs image_size divisible by patch_size, got {image_size} and {patch_size}"
        )
    if dim < 2 or dim % 2 or depth < 1 or mlp_dim < 1:
        raise ValueError(
            f"vit_tiny needs an even dim >= 2, depth >= 1, mlp_dim >= 1; got {dim}, {depth}, {mlp_dim}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"vit_tiny dropout must be in [0, 1), got {dropout}")
    if cls_init not in CLS_INITS:
        raise ValueError(f"vit_tiny cls_init must be one of {list(CLS_INITS)}, got {cls_init!r}")
    return VisionTransformer(
        layer, num_classes, image_size, in_channels, patch_size, dim, depth, mlp_dim, dropout, cls_init
    )

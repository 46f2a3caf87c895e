"""Where tokens of a map are: coordinate channels, feature/coordinate mixing, patch (un)shuffle."""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Smallest per-sample feature std used by :func:`mix_position` (a constant map is not divided by 0).
STD_EPS = 1e-6


def coordinate_channels(height: int, width: int, like: Tensor) -> Tensor:
    """The two coordinate channels of an ``height x width`` map in raster order -> ``[2, H * W]``.

    Row 0 is x (``linspace(-1, 1, W)`` along the width), row 1 is y (``linspace(-1, 1, H)`` along the
    height); dtype and device follow ``like``.
    """
    x = torch.linspace(-1, 1, width, dtype=like.dtype, device=like.device)
    y = torch.linspace(-1, 1, height, dtype=like.dtype, device=like.device)
    return torch.stack([x.expand(height, width), y[:, None].expand(height, width)]).reshape(2, -1)


def pixel_coordinates(height: int, width: int, device: torch.device) -> Tensor:
    """(row, column) of every token of an ``height x width`` map, float32 ``[1, H * W, 2]``.

    Unit spacing on both axes, so the k nearest tokens form the usual square neighbourhood on any map
    shape (``linspace(-1, 1)`` coordinates have different steps along H and W).
    """
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(1, height * width, 2)


def mix_position(features: Tensor, coords: Tensor, weight: float) -> Tensor:
    """Features and coordinates for location+feature similarity: ``[B, C, N]``, ``[2, N] -> [B, C + 2, N]``.

    The features are divided by their per-sample std (over channels and positions, at least
    :data:`STD_EPS`) so both parts have comparable scale, then mixed as
    ``cat(weight * features, (1 - weight) * coords)``.
    """
    std = features.std(dim=(1, 2), keepdim=True).clamp(min=STD_EPS)
    scaled = weight * (features / std)
    place = ((1 - weight) * coords).to(scaled.dtype).expand(features.shape[0], -1, -1)
    return torch.cat([scaled, place], dim=1)


def append_coordinates(values: Tensor, coords: Tensor) -> Tensor:
    """Coordinate channels appended to values for aggregation: ``[B, C, N]``, ``[2, N] -> [B, C + 2, N]``."""
    return torch.cat([values, coords.to(values.dtype).expand(values.shape[0], -1, -1)], dim=1)


def patch_layers(patch: int) -> tuple[nn.Module, nn.Module]:
    """``(PixelUnshuffle(p), PixelShuffle(p))``, or two ``nn.Identity`` for ``p = 1``.

    Unshuffle maps ``[B, C, H, W] -> [B, C * p^2, H / p, W / p]``; shuffle inverts it.
    """
    if patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch}")
    if patch == 1:
        return nn.Identity(), nn.Identity()
    return nn.PixelUnshuffle(patch), nn.PixelShuffle(patch)

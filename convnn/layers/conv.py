"""The plain convolution baseline."""

from __future__ import annotations

from torch import nn

from convnn.layers.registry import register_layer


@register_layer("conv2d", kind="map")
def conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> nn.Conv2d:
    """``nn.Conv2d`` with "same" zero padding (odd ``kernel_size``): ``[B, C, H, W] -> [B, C', H, W]``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"conv2d kernel_size must be a positive odd integer, got {kernel_size}")
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

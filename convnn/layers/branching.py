"""The hybrid branching layer: a Conv2d branch and a ConvNN branch side by side, fused by a 1x1 conv."""

from __future__ import annotations

import inspect
import math
import typing

import torch
from torch import Tensor, nn

from convnn.layers.convnn import ConvNN
from convnn.layers.registry import register_layer


class Branching(nn.Module):
    """``[B, C, H, W] -> [B, C', H, W]``: ``fusion(cat(conv(x), convnn(x)))``.

    Both branches see all C input channels; ``conv`` (None at ratio 1) makes the first
    ``C' - floor(ratio * C')`` channels, ``convnn`` (None at ratio 0) the other ``floor(ratio * C')``;
    ``fusion`` is a 1x1 ``Conv2d(C', C', bias=True)``, kept at ratio 0 and 1.
    """

    def __init__(self, conv: nn.Module | None, convnn: ConvNN | None, out_channels: int) -> None:
        super().__init__()
        self.conv, self.convnn = conv, convnn
        self.fusion = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C', H, W]``."""
        parts = [branch(x) for branch in (self.conv, self.convnn) if branch is not None]
        return self.fusion(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


def branching(
    in_channels: int, out_channels: int, ratio: float = 0.5, kernel_size: int = 3, **convnn_options
) -> Branching:
    """Hybrid branching with ``ratio`` (lambda) of the output channels on ConvNN.

    The Conv2d branch has ``kernel_size``, "same" zero padding and a bias (written as
    ``padding="same"`` as in the reference, so the paper's profiler method counts it as the paper
    did). Every ``convnn`` option (``k``, ``similarity``, ``sampling``, ``bias`` ...) configures the
    ConvNN branch only.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"branching ratio must lie in [0, 1], got {ratio}")
    if kernel_size < 1:
        raise ValueError(f"branching kernel_size must be a positive integer, got {kernel_size}")
    nn_channels = math.floor(ratio * out_channels)
    conv_channels = out_channels - nn_channels
    convnn = ConvNN(in_channels, nn_channels, **convnn_options) if nn_channels else None
    conv = nn.Conv2d(in_channels, conv_channels, kernel_size, padding="same") if conv_channels else None
    return Branching(conv, convnn, out_channels)


def _signature_with_convnn_options() -> inspect.Signature:
    """``branching``'s own parameters followed by every ConvNN option, so the registry sees them all."""
    own = list(inspect.signature(branching).parameters.values())[:-1]
    hints = typing.get_type_hints(ConvNN.__init__)  # resolved, so the registry can check the types
    options = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in list(inspect.signature(ConvNN).parameters.values())[2:]
    ]
    return inspect.Signature(own + options, return_annotation=Branching)


branching.__signature__ = _signature_with_convnn_options()
register_layer("branching", kind="map")(branching)

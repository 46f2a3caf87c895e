"""The layer registry: every conv or attention slot of a backbone is filled from here by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

LAYER_KINDS = ("map", "tokens")


@dataclass(frozen=True)
class LayerEntry:
    """A registered builder and the tensor layout it consumes.

    ``kind`` is ``"map"`` for layers on ``[B, C, H, W]`` (VGG / ResNet slots) and ``"tokens"`` for
    layers on ``[B, N, D]`` (ViT attention slots).
    """

    name: str
    kind: str
    builder: Callable[..., nn.Module]

    def option_names(self) -> list[str]:
        """The keyword options the builder accepts besides ``in_channels`` and ``out_channels``."""
        params = inspect.signature(self.builder).parameters
        return [p for p in params if p not in ("self", "in_channels", "out_channels")]


_REGISTRY: dict[str, LayerEntry] = {}


def register_layer(name: str, kind: str) -> Callable:
    """Class or function decorator adding a builder ``f(in_channels, out_channels, **options)``."""
    if kind not in LAYER_KINDS:
        raise ValueError(f"layer kind {kind!r} is not one of {list(LAYER_KINDS)}")

    def decorate(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"layer {name!r} is registered twice")
        _REGISTRY[name] = LayerEntry(name, kind, builder)
        return builder

    return decorate


def available_layers(kind: str | None = None) -> list[str]:
    """Sorted registered layer names, optionally only those of one ``kind`` ("map" or "tokens")."""
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def layer_entry(name: str) -> LayerEntry:
    """The registry entry for ``name``; unknown names raise a ``ValueError`` listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown layer {name!r}; available layers: {available_layers()}")
    return _REGISTRY[name]


def build_layer(name: str, in_channels: int, out_channels: int, **options) -> nn.Module:
    """Build the layer registered as ``name``.

    Unknown option names raise a ``ValueError`` naming them and the options the layer accepts;
    out-of-range values are rejected by the layer's own constructor, also with a ``ValueError``.
    """
    entry = layer_entry(name)
    allowed = entry.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"layer {name!r} got unknown option(s) {unknown}; allowed options: {allowed}")
    return entry.builder(in_channels, out_channels, **options)

"""The layer registry: every conv or attention slot of a backbone is filled from here by name."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

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

    def option_types(self) -> dict[str, Any]:
        """Each option's annotation, from the builder's signature (string annotations resolved)."""
        target = self.builder.__init__ if inspect.isclass(self.builder) else self.builder
        try:
            hints = typing.get_type_hints(target)
        except (NameError, TypeError):
            hints = {}
        params = inspect.signature(self.builder).parameters
        out = {}
        for name in self.option_names():
            hint = hints.get(name, params[name].annotation)
            out[name] = Any if isinstance(hint, str) or hint is inspect.Parameter.empty else hint
        return out

    def check_options(self, options: dict[str, Any]) -> None:
        """Option names and value types against the builder's signature: a ``ValueError`` naming the
        first bad one as its config key (``layer.k='nine'; allowed: int``) and what is allowed.
        Value ranges are left to the constructor."""
        allowed = self.option_names()
        hints = self.option_types()
        for key, value in options.items():
            if key not in allowed:
                raise ValueError(f"layer.{key}={value!r}; allowed: layer {self.name!r} options {allowed}")
            if not _type_ok(value, hints[key]):
                raise ValueError(f"layer.{key}={value!r}; allowed: {_describe(hints[key])}")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (int/float/bool/str, Literal, unions, lists)."""
    if hint is Any:
        return True
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in get_args(hint))
    if origin in (list, tuple):
        return isinstance(value, list | tuple)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return f"one of {list(get_args(hint))}"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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

"""The model registry: backbones by name, each with the layer kind its slots take."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from convnn.layers import available_layers, build_layer, layer_entry

LayerFactory = Callable[[int, int], nn.Module]
"""Builds one slot: ``factory(in_channels, out_channels) -> nn.Module`` (all slots share one layer config)."""

_FIXED_ARGS = ("layer", "num_classes", "image_size", "in_channels")


@dataclass(frozen=True)
class ModelEntry:
    """A registered backbone builder, the layer kind (``"map"`` or ``"tokens"``) of its slots and the
    smallest input side it takes."""

    name: str
    slot_kind: str
    builder: Callable[..., nn.Module]
    min_image_size: int = 1

    def option_names(self) -> list[str]:
        """The keyword options the builder accepts besides the fixed ``layer``, classes, size, channels."""
        return [p for p in inspect.signature(self.builder).parameters if p not in _FIXED_ARGS]


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, slot_kind: str, min_image_size: int = 1) -> Callable:
    """Decorator adding ``builder(layer, num_classes, image_size, in_channels, **options)`` as ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelEntry(name, slot_kind, builder, min_image_size)
        return builder

    return decorate


def available_models() -> list[str]:
    """Sorted names of the registered backbones."""
    return sorted(_MODELS)


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names raise a ``ValueError`` listing the known ones."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {available_models()}")
    return _MODELS[name]


def _as_dict(cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A plain dict copy of a dict or an omegaconf ``DictConfig`` that must carry ``name``."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    if "name" not in plain:
        raise ValueError(f"the {what} config needs a 'name'; got keys {sorted(plain)}")
    return plain


def input_size(model_cfg: Mapping[str, Any], data_image_size: int) -> int:
    """The side the model is fed: ``model_cfg["image_size"]`` when set (ViT: 224), else the data's size."""
    size = model_cfg.get("image_size")
    return int(data_image_size if size is None else size)


def build_model(
    model_cfg: Mapping[str, Any],
    layer_cfg: Mapping[str, Any],
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
) -> nn.Module:
    """Build backbone ``model_cfg["name"]`` with every slot filled by ``build_layer(layer_cfg["name"], ...)``.

    The model maps ``[B, in_channels, S, S] -> [B, num_classes]`` logits, ``S = input_size(model_cfg,
    image_size)``. The other keys of ``model_cfg`` (except ``image_size``) are the builder's options, those
    of ``layer_cfg`` the layer's. A layer of the wrong kind for the model, an unknown model, layer or option
    raises a ``ValueError`` naming it and the allowed values before anything is built.
    """
    model_opts = _as_dict(model_cfg, "model")
    layer_opts = _as_dict(layer_cfg, "layer")
    entry = model_entry(model_opts.pop("name"))
    size = input_size(model_opts, image_size)
    model_opts.pop("image_size", None)
    unknown = sorted(set(model_opts) - set(entry.option_names()))
    if unknown:
        raise ValueError(
            f"model {entry.name!r} got unknown option(s) {unknown}; allowed options: {entry.option_names()}"
        )
    layer_name = layer_opts.pop("name")
    kind = layer_entry(layer_name).kind
    if kind != entry.slot_kind:
        raise ValueError(
            f"model {entry.name!r} takes {entry.slot_kind!r} layers, but layer {layer_name!r} is a {kind!r} "
            f"layer; layers that fit {entry.name!r}: {available_layers(entry.slot_kind)}"
        )
    if size < entry.min_image_size:
        raise ValueError(f"{entry.name} needs image_size >= {entry.min_image_size}, got {size}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")

    def layer(in_ch: int, out_ch: int) -> nn.Module:
        return build_layer(layer_name, in_ch, out_ch, **layer_opts)

    return entry.builder(layer, num_classes, size, in_channels, **model_opts)


def build_from_config(
    cfg: Mapping[str, Any], check_input: bool = False
) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model a config's ``model`` / ``layer`` / ``data`` describe and its one-image input ``(C, S, S)``.

    The one path from a config to a network (training, ``convnn-profile``, ``convnn-tables`` and the
    accounting script); layer option names and types are checked by the layer registry. With
    ``check_input`` the model also runs once on a zero image (eval mode, no grad, RNG untouched; not
    on the meta device), so problems that depend on the input size (k above the candidates, r > N,
    a patch not dividing H) raise a ``ValueError`` here, before any data is read. Only the RNG of the
    model's device is saved and restored (a CPU model: no CUDA call, so no CUDA context is made on
    the GPUs a DDP rank does not use).
    """
    import torch

    model_cfg, layer_cfg = _as_dict(cfg["model"], "model"), _as_dict(cfg["layer"], "layer")
    data = cfg["data"]
    layer_entry(layer_cfg["name"]).check_options({k: v for k, v in layer_cfg.items() if k != "name"})
    size, channels = input_size(model_cfg, data["image_size"]), data["in_channels"]
    model = build_model(model_cfg, layer_cfg, data["num_classes"], size, channels)
    first = next(model.parameters(), None)
    if not check_input or (first is not None and first.device.type == "meta"):
        return model, (channels, size, size)
    model.eval()
    device = first.device if first is not None else torch.device("cpu")
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model(torch.zeros(1, channels, size, size, device=device))
    except ValueError as e:
        raise ValueError(f"on {channels}x{size}x{size} inputs: {' '.join(str(e).split())}") from None
    finally:
        model.train()
    return model, (channels, size, size)

"""Backbones whose conv / attention slots come from the layer registry. Importing registers every model."""

from convnn.models import resnet, vgg, vit  # noqa: F401  (registers the models)
from convnn.models.registry import (
    available_models,
    build_from_config,
    build_model,
    input_size,
    model_entry,
    register_model,
)

__all__ = [
    "available_models",
    "build_from_config",
    "build_model",
    "input_size",
    "model_entry",
    "register_model",
]

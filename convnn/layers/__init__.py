"""Layer registry and layer families. Importing this package registers every layer."""

from convnn.knn import reset_sampling
from convnn.layers import (  # noqa: F401  (importing registers the layers)
    attention,
    branching,
    conv,
    convnn,
    convnn_attention,
    position,
)
from convnn.layers.registry import available_layers, build_layer, layer_entry, register_layer

__all__ = ["available_layers", "build_layer", "layer_entry", "register_layer", "reset_sampling"]

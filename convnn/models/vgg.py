"""VGG (torchvision's layout, batch-norm variant) with every convolution a registry slot."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.models.registry import LayerFactory, register_model

POOL = "M"
CLASSIFIER_INITS = ("normal", "pytorch")
STAGES: dict[str, list[int | str]] = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg13": [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg16": [64, 64, POOL, 128, 128, POOL, *[256] * 3, POOL, *[512] * 3, POOL, *[512] * 3, POOL],
    "vgg19": [64, 64, POOL, 128, 128, POOL, *[256] * 4, POOL, *[512] * 4, POOL, *[512] * 4, POOL],
}


class AvgPool7(nn.Module):
    """``nn.AdaptiveAvgPool2d((7, 7))`` with a deterministic CUDA backward: ``[B, C, H, W] -> [B, C, 7, 7]``.

    CUDA's adaptive average pooling has none (``torch.use_deterministic_algorithms`` stops on it), so
    the maps VGG meets are pooled by equal ops: a 1x1 map (32x32 inputs: CIFAR) is copied to 7x7
    (``expand(-1, -1, 7, 7)`` as a nearest upsampling, whose backward adds the 49 gradients in the
    pool's order), a map whose sides are multiples of 7 (224x224 inputs) averaged by ``avg_pool2d``
    with kernel ``(H / 7, W / 7)``; equal to the pool on CPU, forward and backward. Other maps, and a
    traced graph (fvcore counts the pool), keep the adaptive pool. No parameters.
    """

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if torch.jit.is_tracing():
            return F.adaptive_avg_pool2d(x, (7, 7))
        if (height, width) == (1, 1):
            return F.interpolate(x, size=(7, 7), mode="nearest")
        if height % 7 == 0 and width % 7 == 0:
            return F.avg_pool2d(x, (height // 7, width // 7))
        return F.adaptive_avg_pool2d(x, (7, 7))


class VGG(nn.Module):
    """``[B, C, S, S] -> [B, classes]``: slots (each + BatchNorm2d + ReLU) and max-pools, 7x7 average pool
    (:class:`AvgPool7`), then ``Linear(512*49, h) ReLU Dropout Linear(h, h) ReLU Dropout Linear(h, classes)``.

    ``classifier_init``: "normal" re-initialises the classifier's weights N(0, 0.01) with zero biases
    (torchvision's VGG); "pytorch" keeps ``nn.Linear``'s defaults, as the paper's reference did.
    """

    def __init__(
        self,
        stages: list[int | str],
        layer: LayerFactory,
        num_classes: int,
        in_channels: int,
        dropout: float,
        hidden_features: int,
        width_mult: float,
        classifier_init: str,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for stage in stages:
            if stage == POOL:
                blocks.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = max(1, round(stage * width_mult))
            blocks += [layer(channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.avgpool = AvgPool7()
        self.classifier = nn.Sequential(
            nn.Linear(channels * 49, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, num_classes),
        )
        for module in self.classifier if classifier_init == "normal" else ():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, S, S] -> [B, classes]``."""
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _vgg_builder(name: str, doc: str) -> Callable[..., VGG]:
    """Register ``name`` as a torchvision-style builder with explicit options."""

    @register_model(name, slot_kind="map", min_image_size=32)  # five 2x2 max-pools
    def build(
        layer: LayerFactory,
        num_classes: int,
        image_size: int,
        in_channels: int = 3,
        dropout: float = 0.5,
        hidden_features: int = 4096,
        width_mult: float = 1.0,
        classifier_init: str = "normal",
    ) -> VGG:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name} dropout must be in [0, 1), got {dropout}")
        if hidden_features < 1 or width_mult <= 0:
            raise ValueError(
                f"{name} needs hidden_features >= 1 and width_mult > 0, "
                f"got {hidden_features} and {width_mult}"
            )
        if classifier_init not in CLASSIFIER_INITS:
            raise ValueError(
                f"{name} classifier_init must be one of {list(CLASSIFIER_INITS)}, got {classifier_init!r}"
            )
        return VGG(
            STAGES[name],
            layer,
            num_classes,
            in_channels,
            dropout,
            hidden_features,
            width_mult,
            classifier_init,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{doc}; ``width_mult`` scales every slot's channels, ``hidden_features`` the classifier, "
        "``classifier_init`` (normal | pytorch) initialises it (see :class:`VGG`)."
    )
    return build


vgg11 = _vgg_builder("vgg11", 'VGG-11 (configuration "A"), the paper\'s CNN')
vgg13 = _vgg_builder("vgg13", 'VGG-13 (configuration "B")')
vgg16 = _vgg_builder("vgg16", 'VGG-16 (configuration "D")')
vgg19 = _vgg_builder("vgg19", 'VGG-19 (configuration "E")')

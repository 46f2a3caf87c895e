"""ResNet (torchvision's v1.5 layout) with every stride-1 3x3 convolution a registry slot."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from convnn.models.registry import LayerFactory, register_model


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, bias: bool) -> nn.Conv2d:
    """A fixed (non-slot) convolution with torchvision's padding ``kernel // 2`` and initialisation."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _conv3x3(layer: LayerFactory, in_ch: int, out_ch: int, stride: int, bias: bool) -> nn.Module:
    """A 3x3 convolution: a registry slot when ``stride == 1``, a fixed strided conv otherwise."""
    return layer(in_ch, out_ch) if stride == 1 else _conv(in_ch, out_ch, 3, stride, bias)


class BasicBlock(nn.Module):
    """``[B, C, H, W] -> [B, planes, H/s, W/s]``: two 3x3 convs with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, layer: LayerFactory, in_ch: int, planes: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(layer, in_ch, planes, stride, bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = layer(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, planes, stride, bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, planes, H/s, W/s]``."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.downsample(x)  # in place, as torchvision (the profiler does not count add_)
        return self.relu(out)


class Bottleneck(nn.Module):
    """``[B, C, H, W] -> [B, 4 planes, H/s, W/s]``: 1x1, 3x3 (stride here, v1.5), 1x1 (ResNet-50)."""

    expansion = 4

    def __init__(self, layer: LayerFactory, in_ch: int, planes: int, stride: int, bias: bool) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, 1, 1, bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(layer, planes, planes, stride, bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out_ch, 1, 1, bias)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 4 planes, H/s, W/s]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        out += self.downsample(x)  # in place, as torchvision (the profiler does not count add_)
        return self.relu(out)


def _shortcut(in_ch: int, out_ch: int, stride: int, bias: bool) -> nn.Module:
    """Identity, or 1x1 conv + BatchNorm2d where the shape changes."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride, bias), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """``[B, C, S, S] -> [B, classes]``: 7x7/2 stem, 3x3/2 max-pool, four stages, global pool, linear.

    Every stride-1 3x3 conv comes from ``layer``; the rest (stem, 1x1s, strided 3x3s, shortcuts) is fixed.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: list[int],
        layer: LayerFactory,
        num_classes: int,
        in_channels: int,
        conv_bias: bool,
        base_width: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv(in_channels, base_width, 7, 2, conv_bias),
            nn.BatchNorm2d(base_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        channels = base_width
        for index, count in enumerate(blocks_per_stage):
            planes = base_width * 2**index
            stage = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                stage.append(block(layer, channels, planes, stride, conv_bias))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, S, S] -> [B, classes]``."""
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def _resnet_builder(
    name: str, block: type[BasicBlock | Bottleneck], blocks_per_stage: list[int], doc: str
) -> Callable[..., ResNet]:
    """Register ``name`` as a torchvision-style builder with explicit options."""

    @register_model(name, slot_kind="map", min_image_size=32)  # the network downsamples by 32
    def build(
        layer: LayerFactory,
        num_classes: int,
        image_size: int,
        in_channels: int = 3,
        conv_bias: bool = False,
        base_width: int = 64,
    ) -> ResNet:
        if base_width < 1:
            raise ValueError(f"{name} base_width must be >= 1, got {base_width}")
        return ResNet(block, blocks_per_stage, layer, num_classes, in_channels, conv_bias, base_width)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{doc}; slots are the stride-1 3x3 convs, ``conv_bias`` adds a bias to every fixed convolution, "
        "``base_width`` is the stem's width (stage i: base_width * 2**i planes)."
    )
    return build


resnet18 = _resnet_builder("resnet18", BasicBlock, [2, 2, 2, 2], "ResNet-18")
resnet34 = _resnet_builder("resnet34", BasicBlock, [3, 4, 6, 3], "ResNet-34")
resnet50 = _resnet_builder("resnet50", Bottleneck, [3, 4, 6, 3], "ResNet-50 v1.5 (13 slots)")

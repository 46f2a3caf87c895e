"""Backbones: registry, slot placement, equality with torchvision, and every paper row's parameter count."""

import math
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from convnn.layers import available_layers
from convnn.models import available_models, build_from_config, build_model, input_size, model_entry
from convnn.models.accounting import fvcore_macs
from convnn.report.tables import read_paper
from convnn.train.profile import compose_config

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
VGG11_SLOTS = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
VGG11_FIXED_PARAMS = 119_592_330  # BatchNorm (2 x 2752) + classifier 25088-4096-4096-10


def paper_rows() -> list[dict[str, str]]:
    """Every row of results/paper/*.csv (the paper's numbers and the overrides that build each row)."""
    return [row for path in sorted(PAPER_DIR.glob("*.csv")) for row in read_paper(path.stem)]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_params(cfg) -> int:
    """Parameters of the configuration ``cfg`` describes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model, _ = build_from_config(cfg)
    return count(model)


def truncated_millions(params: int) -> str:
    """The paper's format: millions truncated (not rounded) to three decimals, e.g. 130,015,690 -> 130.015."""
    return f"{math.floor(params / 1000) / 1000:.3f}"


def vgg11_branching_params(
    ratio: float, patch: int = 1, aggregate_position: bool = False, num_classes: int = 10
) -> int:
    """Independent count of VGG-11 with branching slots C -> C': the ConvNN branch's Conv1d(k=9, bias) makes
    ``n = floor(ratio C')`` channels; PixelUnshuffle(p) multiplies its in and out channels by p^2 (p^4 the
    weights, p^2 the biases); positional encoding in aggregation adds 2 coordinate input channels. The
    Conv2d 3x3 + bias branch makes the other C' - n; the 1x1 fusion C' -> C' has a bias."""
    total = VGG11_FIXED_PARAMS + (num_classes - 10) * 4097
    for c_in, c_out in VGG11_SLOTS:
        n = math.floor(ratio * c_out)
        total += 9 * (patch**2 * c_in + 2 * aggregate_position) * patch**2 * n + patch**2 * n
        total += 9 * c_in * (c_out - n) + (c_out - n)
        total += c_out * c_out + c_out
    return total


def test_vgg11_formula_gives_the_reference_notes_counts():
    assert vgg11_branching_params(0.0) == 130_015_690
    assert vgg11_branching_params(0.0, num_classes=100) == 130_384_420
    assert vgg11_branching_params(0.125, aggregate_position=True) == 130_021_882
    assert vgg11_branching_params(0.5, aggregate_position=True) == 130_040_458
    assert vgg11_branching_params(1.0) == 130_015_690  # k = 9 Conv1d == 3x3 Conv2d in parameters


# Exact counts of the ViT and ResNet rows: reference-notes.md (first block) and derived here (second).
EXACT_PARAMS = {
    "t2.c10.attention": 5_479_306,
    "t2.c100.attention": 5_496_676,
    "t2.c10.convnn_all": 5_500_042,
    "r50.standard": 25_583_592,
    "r50.convnn_all": 25_557_032,
    "r50.branching_all": 26_474_760,
    # D + a bias-free pointwise Conv1d(192, 192) per block; R: Conv1d(192, 192, 9) instead of depthwise.
    "t5.c10.convnn_ds": 5_500_042 + 12 * 192 * 192,
    "t5.c10.convnn_r": 5_500_042 + 12 * (192 * 192 * 9 - 192 * 9),
    # local-attention's LocalMHA, heads=1, dim_head=64: to_qkv 192 -> 3x64 and to_out 64 -> 192, bias-free.
    "t2.c10.local": 5_479_306 - 12 * 4 * 192 * 192 + 12 * (192 * 3 * 64 + 64 * 192),
}

# Rows whose printed count our configuration does not give, with what it gives and why.
PARAM_DISCREPANCIES = {
    "t4.c100.branching.p2": (
        "199.521",
        "a digit transposition in the paper: every CIFAR-100 VGG row is its CIFAR-10 row + 368,730 "
        "(the classifier's 90 extra outputs; 268.289 -> 268.658 for ConvNN p=2), so 199.152 -> 199.521, "
        "printed as 199.512",
    ),
}


def row_id(row: dict[str, str]) -> str:
    return row["row"]


def test_the_paper_csvs_are_there():
    rows = paper_rows()
    assert {r["table"] for r in rows} == {"table1", "table2", "table3", "table4", "table5", "resnet50"}
    assert set(EXACT_PARAMS) <= {r["row"] for r in rows}


@pytest.mark.parametrize("row", paper_rows(), ids=row_id)
def test_paper_row_parameter_count(row):
    """Every row of Tables 1-5 and the ResNet-50 table, to the paper's three decimals (truncated)."""
    cfg = compose_config(shlex.split(row["overrides"]))
    params = meta_params(cfg)
    if cfg.model.name == "vgg11":
        layer = cfg.layer
        assert params == vgg11_branching_params(
            layer.ratio, layer.patch, layer.aggregate_position, cfg.data.num_classes
        )
    if row["row"] in EXACT_PARAMS:
        assert params == EXACT_PARAMS[row["row"]]
    if row["row"] in PARAM_DISCREPANCIES:
        ours, why = PARAM_DISCREPANCIES[row["row"]]
        assert truncated_millions(params) == ours, why
        assert row["params_m"] != ours, f"the paper's figure now matches; drop the discrepancy note ({why})"
    else:
        assert truncated_millions(params) == row["params_m"], row["overrides"]


def test_bare_conv2d_vgg11_is_torchvision_vgg11_bn():
    """A bare Conv2d VGG-11 (the registry's ``conv2d`` in every slot) is torchvision's vgg11_bn, weight for
    weight: same parameter count (128,812,810) and, with our weights loaded in order, the same logits."""
    ours = build_model({"name": "vgg11"}, {"name": "conv2d"}, num_classes=10, image_size=32)
    _assert_same_function(ours, torchvision.models.vgg11_bn, {"num_classes": 10}, torch.randn(2, 3, 32, 32))
    assert count(ours) == 128_812_810
    # reference-notes.md: fvcore gives 0.120 GMAC for this network with "same"-padded convs, which fvcore
    # 0.1.5 skips; ours are integer-padded and counted: + 9 C C' H W over the 8 convs = 152,764,416.
    with torch.no_grad():
        macs, _ = fvcore_macs(ours, torch.randn(1, 3, 32, 32))
    assert abs(macs - 152_764_416 - 0.120e9) < 0.0005e9


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_with_bias_free_conv2d_slots_is_torchvision(name):
    ours = build_model({"name": name}, {"name": "conv2d", "bias": False}, num_classes=1000, image_size=64)
    _assert_same_function(ours, getattr(torchvision.models, name), {}, torch.randn(1, 3, 64, 64))


def _assert_same_function(ours: nn.Module, reference_builder, kwargs: dict, x: torch.Tensor) -> None:
    """Build the torchvision reference (uninitialised), load ``ours``' state into it in registration order
    (names differ, shapes must agree), and compare eval-mode logits."""
    with torch.device("meta"):
        reference = reference_builder(**kwargs)
    reference = reference.to_empty(device="cpu")
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in ref_state.values()]
    reference.load_state_dict(dict(zip(ref_state, ours_state.values(), strict=True)))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def _record_slots(name: str, image_size: int, make=lambda i, o: nn.Conv2d(i, o, 3, padding=1)):
    """The model (on the meta device) and the ``(in, out)`` of every slot the builder asks its factory for."""
    slots: list[tuple[int, int]] = []

    def layer(in_ch: int, out_ch: int) -> nn.Module:
        slots.append((in_ch, out_ch))
        return make(in_ch, out_ch)

    with torch.device("meta"):
        return model_entry(name).builder(layer, 10, image_size, 3), slots


def test_slots_are_vgg_convs_and_resnet_stride1_3x3_convs():
    assert _record_slots("vgg11", 32)[1] == VGG11_SLOTS
    assert len(_record_slots("vgg19", 32)[1]) == 16
    # conv2 of every bottleneck except the first of stages 2-4 (those stride 2): 3 + 3 + 5 + 2
    expected = [(64, 64)] * 3 + [(128, 128)] * 3 + [(256, 256)] * 5 + [(512, 512)] * 2
    assert _record_slots("resnet50", 224)[1] == expected
    # BasicBlock: both 3x3 convs of all 8 blocks, except the strided first conv of stages 2-4
    assert len(_record_slots("resnet18", 224)[1]) == 16 - 3


def test_vit_tiny_has_one_attention_slot_per_block():
    model, slots = _record_slots("vit_tiny", 224, lambda i, o: nn.Identity())
    assert slots == [(192, 192)] * 12
    assert model(torch.randn(2, 3, 224, 224, device="meta")).shape == (2, 10)


def test_registry_lists_every_backbone_with_its_slot_kind():
    assert available_models() == [
        "resnet18",
        "resnet34",
        "resnet50",
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
        "vit_tiny",
    ]
    assert {model_entry(n).slot_kind for n in available_models() if n != "vit_tiny"} == {"map"}
    assert model_entry("vit_tiny").slot_kind == "tokens"


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vgg12'.*vgg11.*vit_tiny"):
        build_model({"name": "vgg12"}, {"name": "conv2d"}, 10, 32)


@pytest.mark.parametrize(
    ("model", "layer", "kind"), [("vit_tiny", "conv2d", "map"), ("vgg11", "attention", "tokens")]
)
def test_incompatible_layer_names_model_layer_and_allowed(model, layer, kind):
    other = "tokens" if kind == "map" else "map"
    allowed = str(available_layers(other)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(
        ValueError, match=rf"model '{model}' takes '{other}'.*'{layer}' is a '{kind}'.*{allowed}"
    ):
        build_model({"name": model}, {"name": layer}, 10, 32)


def test_unknown_model_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\].*'dropout', 'hidden_features'"):
        build_model({"name": "vgg11", "depth": 3}, {"name": "conv2d"}, 10, 32)


@pytest.mark.parametrize(
    ("model", "size", "message"),
    [
        ({"name": "vgg11"}, 16, "vgg11 needs image_size >= 32"),
        ({"name": "resnet18"}, 16, "resnet18 needs image_size >= 32"),
        ({"name": "vit_tiny", "image_size": 200}, 32, "divisible by patch_size, got 200 and 16"),
    ],
)
def test_too_small_or_misaligned_inputs_are_rejected(model, size, message):
    layer = {"name": "attention"} if model["name"] == "vit_tiny" else {"name": "conv2d"}
    with pytest.raises(ValueError, match=message):
        build_model(model, layer, 10, size)


def test_dictconfig_input_and_effective_size():
    model_cfg = OmegaConf.create(
        {"name": "vgg11", "image_size": None, "width_mult": 0.125, "hidden_features": 8}
    )
    assert input_size(model_cfg, 32) == 32
    assert input_size({"name": "vit_tiny", "image_size": 224}, 32) == 224
    model = build_model(
        model_cfg, OmegaConf.create({"name": "conv2d", "kernel_size": 3}), 7, 32, in_channels=1
    )
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("init", ["normal", "pytorch"])
def test_vgg_classifier_init_is_torchvision_normal_or_pytorch_default(init):
    torch.manual_seed(0)
    model_cfg = {"name": "vgg11", "width_mult": 0.125, "hidden_features": 512, "classifier_init": init}
    model = build_model(model_cfg, {"name": "conv2d"}, 10, 32)
    middle = model.classifier[3]  # Linear(512, 512): 262,144 weights
    fan_in_bound = 1 / math.sqrt(512)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
    if init == "normal":
        assert math.isclose(middle.weight.std().item(), 0.01, rel_tol=0.02)
        assert all(torch.count_nonzero(m.bias) == 0 for m in model.classifier if isinstance(m, nn.Linear))
    else:
        assert middle.weight.abs().max() <= fan_in_bound
        assert math.isclose(middle.weight.std().item(), fan_in_bound / math.sqrt(3), rel_tol=0.02)
        assert middle.bias.abs().max() <= fan_in_bound and torch.count_nonzero(middle.bias) == 512
    with pytest.raises(
        ValueError, match=r"classifier_init must be one of \['normal', 'pytorch'\], got 'zero'"
    ):
        build_model({**model_cfg, "classifier_init": "zero"}, {"name": "conv2d"}, 10, 32)


@pytest.mark.parametrize(("init", "std"), [("trunc_normal", 0.02), ("randn", 1.0)])
def test_vit_cls_token_init(init, std):
    torch.manual_seed(0)
    model_cfg = {"name": "vit_tiny", "dim": 4096, "depth": 1, "mlp_dim": 8, "cls_init": init}
    model = build_model(model_cfg, {"name": "attention", "heads": 1}, 10, 32)
    token = model.cls_token.detach().flatten()
    assert math.isclose(token.std().item(), std, rel_tol=0.05) and abs(token.mean().item()) < 0.1 * std
    with pytest.raises(ValueError, match=r"cls_init must be one of \['trunc_normal', 'randn'\], got 'zeros'"):
        build_model({**model_cfg, "cls_init": "zeros"}, {"name": "attention"}, 10, 32)

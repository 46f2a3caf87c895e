"""Map layers (convnn, branching) against torch's Conv2d, the paper's Algorithm 1 and hand counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from convnn.knn.reference import Algorithm1ConvNN, algorithm1_on_map
from convnn.layers import build_layer, layer_entry, reset_sampling
from convnn.layers.convnn import ConvNN


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("height", "width", "chunk"), [(5, 5, None), (4, 7, 3), (1, 6, None)])
def test_position_selection_is_a_zero_padded_3x3_convolution(height, width, chunk):
    layer = build_layer("convnn", 3, 4, select_by="position", chunk_size=chunk).double()
    x = rand(2, 3, height, width)
    ref = F.conv2d(x, layer.aggregate.weight.view(4, 3, 3, 3), layer.aggregate.bias, padding=1)
    out = layer(x)
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-9


def test_position_selection_survives_bf16_autocast():
    layer = build_layer("convnn", 3, 4, select_by="position")
    x = rand(1, 3, 30, 30, dtype=torch.float32)
    ref = F.conv2d(x, layer.aggregate.weight.view(4, 3, 3, 3), layer.aggregate.bias, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_one_self_first_neighbour_is_a_1x1_convolution():
    layer = build_layer("convnn", 5, 3, k=1).double()
    x = rand(2, 5, 6, 4)
    ref = F.conv2d(x, layer.aggregate.weight.view(3, 5, 1, 1), layer.aggregate.bias)
    torch.testing.assert_close(layer(x), ref)


def test_feature_selection_aggregates_the_reference_neighbours():
    # identity projections, rho ones: out[:, :, i] = Conv1d over the rows of (self, k-1 most cosine-similar)
    layer = build_layer("convnn", 4, 2, k=3, padding=0).double()
    x = rand(1, 4, 3, 3)
    tokens = x.flatten(2)[0].T
    s = F.cosine_similarity(tokens[:, None], tokens[None], dim=-1)
    s.fill_diagonal_(1.1)
    idx = s.topk(3, dim=-1).indices
    w, b = layer.aggregate.weight, layer.aggregate.bias
    ref = torch.einsum("ocj,ijc->oi", w, tokens[idx]) + b[:, None]
    torch.testing.assert_close(layer(x)[0].flatten(1), ref)


def test_matches_algorithm1_where_semantics_coincide():
    # Algorithm 1: linear projections, cosine, softmax, all tokens compete, no padding.
    torch.manual_seed(0)
    ref = Algorithm1ConvNN(6, 5, k=4).double()
    for proj in (ref.w_q, ref.w_k, ref.w_v):
        nn.init.zeros_(proj.bias)
    layer = build_layer(
        "convnn", 6, 5, k=4, projections="linear", rho="softmax", self_first=False, padding=0
    ).double()
    with torch.no_grad():
        layer.w_q.weight.copy_(ref.w_k.weight)  # Algorithm 1 ranks S[i, j] = k_i . q_j
        layer.w_k.weight.copy_(ref.w_q.weight)
        layer.w_v.weight.copy_(ref.w_v.weight)
        layer.aggregate.weight.copy_(ref.conv1d.weight)
        layer.aggregate.bias.copy_(ref.conv1d.bias)
    x = rand(2, 6, 5, 4)
    torch.testing.assert_close(layer(x), algorithm1_on_map(ref, x))


def test_chunked_layer_equals_unchunked():
    x = rand(2, 3, 6, 6)
    whole = build_layer("convnn", 3, 4, rho="softmax", select_by="both").double()
    parts = build_layer("convnn", 3, 4, rho="softmax", select_by="both", chunk_size=5).double()
    parts.load_state_dict(whole.state_dict())
    torch.testing.assert_close(whole(x), parts(x))


def test_random_sampling_is_reproducible_in_eval_after_reset():
    layer = build_layer("convnn", 3, 4, sampling="random", num_candidates=10).eval()
    x = rand(1, 3, 6, 6, dtype=torch.float32)
    reset_sampling(layer, seed=7)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # the generator moves on between batches
    reset_sampling(layer, seed=7)
    assert torch.equal(first, layer(x))


@pytest.mark.parametrize("sampling", ["all", "spatial"])
def test_gradcheck(sampling):
    layer = build_layer(
        "convnn",
        2,
        3,
        k=4,
        projections="linear",
        proj_dim=3,
        rho="softmax",
        select_by="both",
        aggregate_position=True,
        sampling=sampling,
        num_candidates=9,
    ).double()
    x = rand(1, 2, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


OPTIONS = {
    "k": st.integers(1, 5),
    "similarity": st.sampled_from(["cosine", "dot", "euclidean"]),
    "projections": st.sampled_from(["identity", "linear"]),
    "rho": st.sampled_from(["ones", "softmax"]),
    "sampling": st.sampled_from(["all", "random", "spatial"]),
    "select_by": st.sampled_from(["features", "both"]),
    "aggregate_position": st.booleans(),
    "position_weight": st.floats(0, 1),
    "patch": st.sampled_from([1, 2]),
    "padding": st.integers(0, 2),
    "aggregation": st.sampled_from(["standard", "separable"]),
    "unit_init": st.booleans(),
    "bias": st.booleans(),
    "self_first": st.booleans(),
    "chunk_size": st.sampled_from([None, 7]),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.fixed_dictionaries(OPTIONS), ratio=st.sampled_from([0.0, 0.5, 1.0]), autocast=st.booleans())
def test_every_option_combination_is_finite_and_shaped(options, ratio, autocast):
    layer = build_layer("branching", 3, 4, ratio=ratio, num_candidates=9, **options)
    x = rand(2, 3, 8, 6, dtype=torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    assert out.shape == (2, 4, 8, 6)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("select_by", ["features", "both"])
def test_zero_input_gives_no_nan(similarity, select_by):
    layer = build_layer("convnn", 3, 4, similarity=similarity, select_by=select_by, rho="softmax")
    x = torch.zeros(1, 3, 5, 5, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_branching_parameter_counts_by_hand():
    c, c_out, k = 64, 128, 9
    conv = c * 64 * 9 + 64  # conv branch: 128 - floor(0.5 * 128) channels
    convnn = c * 64 * k + 64  # aggregation Conv1d(64, 64, k=9)
    fusion = c_out * c_out + c_out
    assert n_params(build_layer("branching", c, c_out, ratio=0.5)) == conv + convnn + fusion
    with_pos = build_layer("branching", c, c_out, ratio=0.5, aggregate_position=True)
    assert n_params(with_pos) == conv + convnn + fusion + 2 * k * 64
    assert n_params(build_layer("branching", c, c_out, ratio=0.0)) == c * c_out * 9 + c_out + fusion
    only_nn = build_layer("branching", c, c_out, ratio=1.0)
    assert only_nn.conv is None and n_params(only_nn) == c * c_out * k + c_out + fusion
    # floor(0.3 * 10) = 3 channels on ConvNN, 7 on the conv branch
    small = build_layer("branching", 4, 10, ratio=0.3)
    assert small.convnn.aggregate.out_channels == 3 and small.conv.out_channels == 7


def test_branching_ends_are_single_branches_with_fusion():
    x = rand(2, 3, 5, 5)
    zero = build_layer("branching", 3, 6, ratio=0.0).double()
    torch.testing.assert_close(zero(x), zero.fusion(zero.conv(x)))
    one = build_layer("branching", 3, 6, ratio=1.0).double()
    torch.testing.assert_close(one(x), one.fusion(one.convnn(x)))
    half = build_layer("branching", 3, 6, ratio=0.5).double()
    torch.testing.assert_close(half(x), half.fusion(torch.cat([half.conv(x), half.convnn(x)], dim=1)))


def test_patch_unshuffles_and_multiplies_aggregation_channels():
    layer = build_layer("convnn", 3, 5, patch=2)
    assert (layer.aggregate.in_channels, layer.aggregate.out_channels) == (12, 20)
    assert layer(rand(2, 3, 6, 4, dtype=torch.float32)).shape == (2, 5, 6, 4)


def test_aggregation_kinds_and_unit_init():
    depthwise = build_layer("convnn", 4, 8, aggregation="depthwise", unit_init=True, bias=False)
    assert depthwise.aggregate.groups == 4 and (depthwise.aggregate.weight == 1).all()
    separable = build_layer("convnn", 4, 6, aggregation="separable")
    assert separable.aggregate.groups == 4 and separable.pointwise.out_channels == 6
    assert n_params(separable) == 4 * 9 + 4 * 6 + 6
    assert isinstance(ConvNN(4, 4).w_q, nn.Identity)
    linear = ConvNN(4, 4, projections="linear", proj_dim=2)
    assert linear.w_q.out_channels == 2 and linear.w_v.out_channels == 4


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_trace_and_changing_input_sizes():
    layer = build_layer("branching", 3, 4, select_by="both", sampling="spatial", num_candidates=9).eval()
    x = rand(1, 3, 6, 6, dtype=torch.float32)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))
    assert layer(rand(1, 3, 9, 5, dtype=torch.float32)).shape == (1, 4, 9, 5)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    layer = build_layer("convnn", 3, 4, rho="softmax", sampling="spatial", num_candidates=9).eval()
    x = rand(2, 3, 6, 6, dtype=torch.float32)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sampling": "grid"}, r"sampling must be one of \['all', 'random', 'spatial'\], got 'grid'"),
        ({"similarity": "l2"}, r"similarity must be one of .*, got 'l2'"),
        ({"select_by": "place"}, r"select_by must be one of \['features', 'position', 'both'\]"),
        ({"aggregation": "grouped"}, r"aggregation must be one of .*, got 'grouped'"),
        ({"sampling": "random"}, "sampling='random' needs a positive num_candidates, got None"),
        ({"k": 0}, "k must be a positive integer, got 0"),
        ({"proj_dim": 8}, "proj_dim=8 needs projections='linear'"),
        ({"projections": "linear", "select_by": "position"}, "projections='linear' needs select_by"),
        ({"position_weight": 1.5}, r"position_weight must lie in \[0, 1\], got 1.5"),
        ({"aggregation": "depthwise", "aggregate_position": True}, "multiple of the aggregated channels"),
        ({"patch": 0}, "patch must be a positive integer, got 0"),
        ({"padding": -1}, "padding must be >= 0, got -1"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer or None, got 0"),
    ],
)
def test_bad_options_are_rejected_at_build(options, message):
    with pytest.raises(ValueError, match=message):
        build_layer("convnn", 4, 8, **options)


def test_bad_branching_options_are_rejected():
    with pytest.raises(ValueError, match=r"branching ratio must lie in \[0, 1\], got 1.5"):
        build_layer("branching", 4, 8, ratio=1.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kk'\].*'ratio', 'kernel_size', 'k'"):
        build_layer("branching", 4, 8, kk=3)
    assert "num_candidates" in layer_entry("branching").option_names()


@pytest.mark.parametrize(
    ("options", "size", "message"),
    [
        ({"k": 30, "padding": 0}, (5, 5), r"k=30 exceeds the 25 candidate tokens of the padded 5x5 map"),
        ({"sampling": "random", "num_candidates": 50}, (5, 5), "got r=50, N=49"),
        ({"sampling": "spatial", "num_candidates": 4, "k": 5}, (5, 5), "k=5 exceeds the 4 candidate tokens"),
        ({"patch": 2}, (5, 4), r"patch=2 needs H and W divisible by it, got \(5, 4\)"),
    ],
)
def test_size_dependent_errors_at_first_forward(options, size, message):
    layer = build_layer("convnn", 2, 2, **options)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(1, 2, *size))


def test_self_first_puts_each_token_first():
    # with k = 2 and self_first, a token's output mixes itself (slot 0) and one other token (slot 1)
    layer = build_layer("convnn", 1, 1, k=2, padding=0, bias=False, self_first=True).double()
    with torch.no_grad():
        layer.aggregate.weight.copy_(torch.tensor([[[1.0, 0.0]]]))
    x = rand(1, 1, 4, 4)
    torch.testing.assert_close(layer(x), x)
    assert math.isclose(n_params(layer), 2)


def test_spatial_grid_candidates_are_real_pixels_of_the_padded_map():
    # 3x7 map, padding 1 -> 5x9 tokens; a 3x3 grid over the real pixels: padded rows 1..3, columns
    # 1, 4, 7. Each real token: itself, then the 2 most cosine-similar grid tokens other than itself.
    layer = build_layer("convnn", 2, 3, k=3, sampling="spatial", num_candidates=9).double()
    x = rand(1, 2, 3, 7)
    tokens = F.pad(x, [1] * 4).flatten(2)[0].T  # [45, C]
    grid = [r * 9 + c for r in (1, 2, 3) for c in (1, 4, 7)]
    w, b = layer.aggregate.weight, layer.aggregate.bias
    expected = torch.zeros(3, 21, dtype=torch.float64)
    for out_i, (r, c) in enumerate((r, c) for r in range(1, 4) for c in range(1, 8)):
        i = r * 9 + c
        others = [j for j in grid if j != i]
        sims = F.cosine_similarity(tokens[i][None], tokens[others], dim=-1)
        picked = [i] + [others[j] for j in sims.topk(2).indices]
        expected[:, out_i] = torch.einsum("ocj,jc->o", w, tokens[picked]) + b
    torch.testing.assert_close(layer(x)[0].flatten(1), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("sampling", "r"), [("spatial", 16), ("random", 26)])
def test_fallback_to_all_uses_every_candidate_only_where_r_does_not_fit(sampling, r):
    # a 3x3 map padded to 5x5 (25 tokens): neither a 4x4 grid over 3x3 real pixels nor 26 random tokens fit
    x = rand(2, 3, 3, 3)
    every = build_layer("convnn", 3, 4).double()
    fallback = build_layer("convnn", 3, 4, sampling=sampling, num_candidates=r, fallback_to_all=True).double()
    fallback.load_state_dict(every.state_dict())
    torch.testing.assert_close(fallback(x), every(x), rtol=0, atol=0)
    strict = build_layer("convnn", 3, 4, sampling=sampling, num_candidates=r)
    with pytest.raises(
        ValueError, match="fallback_to_all=true" if sampling == "spatial" else "got r=26, N=25"
    ):
        strict(x.float())
    fitting = build_layer("convnn", 3, 4, sampling=sampling, num_candidates=9, fallback_to_all=True).double()
    fitting.load_state_dict(every.state_dict())
    assert not torch.allclose(fitting.eval()(x), every(x))  # r fits: sampled, not all


@pytest.mark.parametrize("sampling", ["all", "random", "spatial"])
@pytest.mark.parametrize(("patch", "self_first", "rho"), [(1, True, "softmax"), (2, False, "ones")])
def test_position_selection_with_every_sampling(sampling, patch, self_first, rho):
    layer = build_layer(
        "convnn",
        3,
        4,
        select_by="position",
        sampling=sampling,
        num_candidates=16,
        patch=patch,
        self_first=self_first,
        rho=rho,
        aggregate_position=True,
    )
    x = rand(2, 3, 8, 8, dtype=torch.float32).requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rho", ["ones", "softmax"])
def test_training_queries_only_the_unpadded_tokens_and_evaluation_all_as_the_reference(monkeypatch, rho):
    """With gradients (whatever rho) only the H * W real tokens query; without, all (H+2)(W+2) do (the
    reference's ops, for the paper's profiler GFLOPs); both give the same output."""
    import convnn.layers.convnn as module

    rows: list[int] = []
    real_select = module.knn_select

    def counting(q, *args, **kwargs):
        rows.append(q.shape[1])
        return real_select(q, *args, **kwargs)

    monkeypatch.setattr(module, "knn_select", counting)
    torch.manual_seed(0)
    layer = ConvNN(3, 4, rho=rho, similarity="cosine", projections="linear")
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    trained = layer(x)
    with torch.no_grad():
        evaluated = layer(x)
    assert rows == [5 * 6, 7 * 8]
    torch.testing.assert_close(trained, evaluated)

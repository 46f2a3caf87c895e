"""Token layers ``[B, N, D]`` for ViT slots, checked against independently written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convnn.knn import reset_sampling
from convnn.layers import available_layers, build_layer

TOKEN_LAYERS = ["attention", "convnn_attention", "kvt_attention", "local_attention", "sparse_attention"]


def weights(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """The ``(W_q, W_k, W_v, W_o)`` matrices of a layer (``y = x W^T``)."""
    return tuple(getattr(layer, name).weight for name in ("w_q", "w_k", "w_v", "w_o"))


def dense_reference(x, w_q, w_k, w_v, w_o, heads, allowed=None, top_k=None, q_pos=None, k_pos=None):
    """Masked multi-head softmax attention written out per head, with plain tensor ops.

    ``allowed[i, j]`` (bool ``[N, N]``) restricts the keys; ``top_k`` keeps each query's top-k scores;
    ``q_pos``/``k_pos`` apply a rotary embedding (complex-number form) at those positions.
    """
    b, n, _ = x.shape
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    d = q.shape[-1] // heads
    outputs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        if q_pos is not None:
            qh, kh = rotate_complex(qh, q_pos), rotate_complex(kh, k_pos)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(d)
        mask = torch.ones(b, n, n, dtype=torch.bool) if allowed is None else allowed.expand(b, n, n).clone()
        if top_k is not None:
            order = scores.argsort(dim=-1, descending=True)
            keep = torch.zeros_like(mask)
            for bi in range(b):
                for i in range(n):
                    keep[bi, i, order[bi, i, :top_k]] = True
            mask &= keep
        scores = scores.masked_fill(~mask, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(outputs, dim=-1) @ w_o.T


def rotate_complex(t, positions):
    """Rotary embedding: channel pairs ``(c, c + d/2)`` as complex numbers times ``e^{i p theta_c}``."""
    half = t.shape[-1] // 2
    theta = 1.0 / 10000 ** (torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
    z = torch.complex(t[..., :half], t[..., half:])
    z = z * torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None] * theta)
    return torch.cat((z.real, z.imag), dim=-1)


def copy_projections(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the ``w_q, w_k, w_v, w_o`` weights of ``source``."""
    target.load_state_dict({n: p for n, p in source.state_dict().items() if n.startswith("w_")}, strict=False)


def tokens(b=2, n=9, d=12, seed=0):
    torch.manual_seed(seed)
    return torch.randn(b, n, d, dtype=torch.float64)


def build(name, d=12, **options):
    options.setdefault("dropout", 0.0)
    return build_layer(name, d, d, **options).double().eval()


def test_registry_lists_the_token_layers():
    assert set(TOKEN_LAYERS) <= set(available_layers("tokens"))


@pytest.mark.parametrize("heads", [1, 3])
def test_attention_equals_explicit_softmax_and_multihead_attention(heads):
    layer, x = build("attention", heads=heads), tokens()
    expected = dense_reference(x, *weights(layer), heads)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    mha = nn.MultiheadAttention(12, heads, bias=False, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.w_q.weight, layer.w_k.weight, layer.w_v.weight]))
        mha.out_proj.weight.copy_(layer.w_o.weight)
    torch.testing.assert_close(layer(x), mha(x, x, x, need_weights=False)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 2])
def test_convnn_attention_with_all_neighbours_is_attention(heads):
    x = tokens()
    layer = build("convnn_attention", k=9, similarity="dot", self_first=False, heads=heads)
    expected = dense_reference(x, *weights(layer), heads)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    attention = build("attention", heads=heads)
    copy_projections(layer, attention)
    torch.testing.assert_close(layer(x), attention(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 2])
def test_convnn_attention_with_k_below_n_is_kvt(heads):
    x = tokens()
    layer = build("convnn_attention", k=4, similarity="dot", self_first=False, heads=heads)
    kvt = build("kvt_attention", k=4, heads=heads)
    copy_projections(layer, kvt)
    expected = dense_reference(x, *weights(layer), heads, top_k=4)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(kvt(x), expected, rtol=0, atol=1e-12)


def test_unit_init_starts_every_aggregation_as_the_neighbour_sum():
    x = tokens()
    depthwise = build("convnn_attention", k=3)
    for aggregation in ("separable", "standard", "sum"):
        other = build("convnn_attention", k=3, aggregation=aggregation)
        copy_projections(depthwise, other)
        torch.testing.assert_close(other(x), depthwise(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("self_logit", [None, 1.0, -2.5])
def test_random_sampling_follows_the_documented_semantics(self_logit):
    """Self first, scored q_i . k_i / sqrt(d) (or the constant ``self_logit``), then the k-1 best others."""
    x = tokens(b=2, n=8, d=4)
    layer = build("convnn_attention", d=4, k=3, sampling="random", num_candidates=4, self_logit=self_logit)
    reset_sampling(layer, 5)
    candidates = layer.sampler.candidates(8)
    reset_sampling(layer, 5)
    out = layer(x)
    w_q, w_k, w_v, w_o = weights(layer)
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    expected = torch.zeros_like(out)
    for bi in range(2):
        for i in range(8):
            others = [int(c) for c in candidates if c != i]
            scores = {c: float(q[bi, i] @ k[bi, c]) / 2.0 for c in others}
            best = sorted(others, key=lambda c: -scores[c])[:2]
            own = float(q[bi, i] @ k[bi, i]) / 2.0 if self_logit is None else self_logit
            logits = torch.tensor([own] + [scores[c] for c in best], dtype=torch.float64)
            rows = torch.stack([v[bi, i]] + [v[bi, c] for c in best])
            expected[bi, i] = (torch.softmax(logits, 0) @ rows) @ w_o.T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("self_first", "self_logit", "key_rows"), [(False, None, 4), (True, None, 16), (True, 1.0, 4)]
)
def test_key_projection_runs_on_candidates_unless_the_self_key_is_needed(self_first, self_logit, key_rows):
    layer = build(
        "convnn_attention",
        k=3,
        sampling="random",
        num_candidates=4,
        self_first=self_first,
        self_logit=self_logit,
    )
    seen = []
    layer.w_k.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    layer(tokens(n=16))
    assert seen == [key_rows]


def test_self_logit_scores_self_constantly_with_all_candidates_too():
    # sampling "all" with a forced self neighbour: softmax over [self_logit, k - 1 best other scores]
    x = tokens(b=1, n=6, d=4)
    layer = build("convnn_attention", d=4, k=3, self_first=True, self_logit=1.0)
    w_q, w_k, w_v, w_o = weights(layer)
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    expected = torch.zeros_like(x)
    for i in range(6):
        scores = (q[0, i] @ k[0].T) / 2.0
        scores[i] = -math.inf
        best = scores.topk(2).indices
        weights_i = torch.softmax(torch.cat([torch.tensor([1.0], dtype=torch.float64), scores[best]]), 0)
        expected[0, i] = (weights_i @ torch.stack([v[0, i], *v[0, best]])) @ w_o.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout_on", ["weights", "output"])
def test_dropout_on_output_drops_the_aggregated_channels_before_w_o(dropout_on):
    # k = n, all candidates, no forced self: the layer is attention; "output" drops elements of the
    # aggregated [B, D, N] tensor (the reference's mask) before w_o, "weights" drops neighbour weights
    x = tokens(b=2, n=5, d=4)
    layer = build("convnn_attention", d=4, k=5, self_first=False, dropout=0.5, dropout_on=dropout_on).train()
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    mask = F.dropout(torch.ones(2, 4, 5, dtype=torch.float64), 0.5).transpose(1, 2)  # [B, N, D]
    w_q, w_k, w_v, w_o = weights(layer)
    attended = torch.softmax((x @ w_q.T) @ (x @ w_k.T).transpose(1, 2) / 2.0, dim=-1) @ (x @ w_v.T)
    expected = (attended * mask) @ w_o.T
    if dropout_on == "output":
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    else:
        assert not torch.allclose(out, expected)
    torch.testing.assert_close(layer.eval()(x), attended @ w_o.T, rtol=0, atol=1e-12)  # off in eval


def test_random_sampling_is_reproducible():
    x = tokens(n=16)
    layer = build("convnn_attention", k=3, sampling="random", num_candidates=5)
    assert reset_sampling(layer, 7) == 1
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    reset_sampling(layer, 7)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(3)
    drawn = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), drawn, rtol=0, atol=0)


def test_spatial_sampling_keys_the_truncated_linspace():
    x = tokens(n=12)
    layer = build("convnn_attention", k=2, sampling="spatial", num_candidates=4, rho="ones", self_first=False)
    layer.aggregate.weight.data.fill_(0.5)
    w_q, w_k, w_v, w_o = weights(layer)
    q, k, v = x @ w_q.T, x @ w_k.T, x @ w_v.T
    grid = torch.tensor([0, 3, 7, 11])  # linspace(0, 11, 4) = 0, 3.67, 7.33, 11, truncated
    top = (q @ k[:, grid].transpose(1, 2)).topk(2, dim=-1).indices
    rows = torch.stack([v[b, grid[top[b]]] for b in range(2)])  # [B, N, 2, D]
    torch.testing.assert_close(layer(x), rows.sum(2) * 0.5 @ w_o.T, rtol=0, atol=1e-12)


def test_position_selection_is_a_1d_convolution_of_the_values():
    """k = 3 nearest tokens by index, in order: interior tokens see i-1, i, i+1; the ends shift in."""
    x = tokens(n=10)
    layer = build(
        "convnn_attention",
        k=3,
        select_by="position",
        projections="identity",
        rho="ones",
        aggregation="standard",
    )
    conv = F.conv1d(x.transpose(1, 2), layer.aggregate.weight, layer.aggregate.bias)  # [B, D, N - 2]
    conv = torch.cat([conv[..., :1], conv, conv[..., -1:]], dim=-1).transpose(1, 2)
    torch.testing.assert_close(layer(x), conv @ layer.w_o.weight.T, rtol=0, atol=1e-12)


def test_position_weight_one_selects_by_features_alone():
    """Cosine ignores the 1/std feature scaling and the zero-weighted position channel."""
    x = tokens()
    options = {"k": 4, "similarity": "cosine", "projections": "identity"}
    features = build("convnn_attention", **options)
    both = build("convnn_attention", select_by="both", position_weight=1.0, **options)
    copy_projections(features, both)
    both.aggregate.load_state_dict(features.aggregate.state_dict())
    torch.testing.assert_close(both(x), features(x), rtol=0, atol=1e-12)
    assert both.w_q(torch.zeros(1, 2, 13)).shape[-1] == 13


@pytest.mark.parametrize(("n", "window", "heads"), [(11, 4, 1), (12, 4, 2), (5, 8, 1), (20, 3, 2)])
def test_local_attention_equals_masked_dense_attention(n, window, heads):
    x = tokens(n=n)
    layer = build("local_attention", window=window, heads=heads, dim_head=4, rotary=False)
    i = torch.arange(n)
    allowed = (i[:, None] - i[None, :]).abs() <= window  # real tokens only: padding never takes part
    expected = dense_reference(x, *weights(layer), heads, allowed=allowed)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_local_attention_rotary_encodes_the_package_offset():
    n, window = 10, 4
    x = tokens(n=n)
    layer = build("local_attention", window=window, heads=2, dim_head=6)
    i = torch.arange(n)
    allowed = (i[:, None] - i[None, :]).abs() <= window
    positions = i.to(torch.float64)
    expected = dense_reference(
        x, *weights(layer), 2, allowed=allowed, q_pos=positions + window, k_pos=positions
    )
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_local_attention_masks_the_padding():
    """N = 6 < window = 8: every token attends to the 6 real tokens only, not to the 2 zero pads."""
    x = tokens(n=6)
    layer = build("local_attention", window=8, dim_head=4, rotary=False)
    out = layer(x)
    torch.testing.assert_close(out, dense_reference(x, *weights(layer), 1), rtol=0, atol=1e-12)
    w_q, w_k, w_v, w_o = weights(layer)
    q, k, v = x @ w_q.T, F.pad(x @ w_k.T, (0, 0, 0, 2)), F.pad(x @ w_v.T, (0, 0, 0, 2))
    unmasked = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v @ w_o.T  # the reference's defect
    assert (out - unmasked).abs().max() > 1e-3


@pytest.mark.parametrize(("context", "heads"), [(49, 1), (5, 3), (2, 1)])
def test_sparse_attention_equals_band_masked_attention(context, heads):
    n = 13
    x = tokens(n=n)
    layer = build("sparse_attention", context=context, heads=heads)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        allowed[i, max(0, i - context // 2) : min(n, i + context // 2 + 1)] = True
    expected = dense_reference(x, *weights(layer), heads, allowed=allowed)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", TOKEN_LAYERS)
def test_dropout_only_in_training(name):
    layer = build(name, dropout=0.5, **({"dim_head": 4} if name == "local_attention" else {}))
    x = tokens()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


GRADCHECK_CASES = [
    ("attention", {"heads": 2}),
    ("kvt_attention", {"k": 3}),
    ("sparse_attention", {"context": 3}),
    ("local_attention", {"window": 2, "dim_head": 2, "heads": 2}),
    ("convnn_attention", {"k": 3, "similarity": "cosine", "sampling": "random", "num_candidates": 4}),
    ("convnn_attention", {"k": 2, "similarity": "euclidean", "aggregation": "separable", "heads": 2}),
    ("convnn_attention", {"k": 2, "select_by": "both", "self_first": True}),
]


@pytest.mark.parametrize(("name", "options"), GRADCHECK_CASES)
def test_gradcheck(name, options):
    layer = build(name, d=4, **options)
    reset_sampling(layer, 0)
    x = tokens(b=1, n=5, d=4).requires_grad_()

    def run(inp):
        reset_sampling(layer, 0)
        return layer(inp)

    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-6)


BF16_CASES = [
    ("attention", {}),
    ("kvt_attention", {}),
    ("sparse_attention", {"context": 5}),
    ("local_attention", {"window": 8}),
    ("convnn_attention", {"similarity": "cosine"}),
    ("convnn_attention", {"similarity": "euclidean", "sampling": "random", "num_candidates": 12}),
    ("convnn_attention", {"sampling": "spatial", "num_candidates": 10, "aggregation": "standard"}),
    ("convnn_attention", {"select_by": "both", "sampling": "random", "num_candidates": 12}),
    ("convnn_attention", {"select_by": "position", "projections": "identity", "rho": "ones"}),
]


@pytest.mark.parametrize(("name", "options"), BF16_CASES)
def test_bf16_autocast_is_finite_also_on_zero_tokens(name, options):
    layer = build_layer(name, 32, 32, **options).train()
    x = torch.randn(2, 20, 32)
    x[0] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.shape == (2, 20, 32)
    assert torch.isfinite(out.float()).all()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(4, 24),
    heads=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 4),
    similarity=st.sampled_from(["cosine", "dot", "euclidean"]),
    rho=st.sampled_from(["ones", "softmax"]),
    sampling=st.sampled_from(["all", "random", "spatial"]),
    aggregation=st.sampled_from(["standard", "depthwise", "separable", "sum"]),
    select_by=st.sampled_from(["features", "both", "position"]),
    self_first=st.sampled_from([None, True, False]),
    bf16=st.booleans(),
)
def test_every_option_combination_gives_finite_outputs(
    n, heads, k, similarity, rho, sampling, aggregation, select_by, self_first, bf16
):
    options = {"k": k, "similarity": similarity, "rho": rho, "sampling": sampling, "heads": heads}
    options |= {"aggregation": aggregation, "select_by": select_by, "self_first": self_first}
    if sampling != "all":
        options["num_candidates"] = 4
    if select_by != "features":
        options["projections"] = "identity"
        options["heads"] = 1 if select_by == "both" else heads
    layer = build_layer("convnn_attention", 8, 12, **options).train()
    x = torch.randn(2, n, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    out.float().sum().backward()
    assert out.shape == (2, n, 12)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("convnn_attention", {"k": 9, "sampling": "random", "num_candidates": 4}, r"k=9 .*num_candidates=4"),
        ("convnn_attention", {"similarity": "manhattan"}, r"\['cosine', 'dot', 'euclidean'\].*'manhattan'"),
        ("convnn_attention", {"sampling": "grid", "num_candidates": 4}, r"\['all', 'random', 'spatial'\]"),
        ("convnn_attention", {"aggregation": "dense"}, r"\['standard', 'depthwise', 'separable', 'sum'\]"),
        ("convnn_attention", {"rho": "sigmoid"}, r"\['ones', 'softmax'\].*'sigmoid'"),
        ("convnn_attention", {"projections": "mlp"}, r"\['linear', 'identity'\].*'mlp'"),
        ("convnn_attention", {"sampling": "random"}, r"num_candidates"),
        ("convnn_attention", {"aggregation": "sum", "bias": True}, r"bias=False"),
        ("convnn_attention", {"proj_dim": 10, "heads": 4}, r"heads=4 .*10"),
        ("attention", {"heads": 5}, r"heads=5 .*\[1, 2, 3, 4, 6, 12\]"),
        ("attention", {"dropout": 1.0}, r"dropout=1.0 .*\[0, 1\)"),
        ("local_attention", {"window": 0}, r"window=0"),
        ("local_attention", {"dim_head": 3}, r"even dim_head.*3"),
        ("sparse_attention", {"context": -1}, r"context=-1"),
        ("kvt_attention", {"k": 0}, r"k=0"),
        ("convnn_attention", {"select_by": "time"}, r"\['features', 'position', 'both'\].*'time'"),
        ("convnn_attention", {"dropout_on": "scores"}, r"dropout_on must be one of \['weights', 'output'\]"),
        ("convnn_attention", {"self_logit": 1.0}, r"self_logit=1.0 .*needs self_first=true"),
        ("convnn_attention", {"self_logit": 1.0, "self_first": True, "rho": "ones"}, r"needs rho='softmax'"),
        ("convnn_attention", {"select_by": "position"}, r"projections='identity'"),
        ("convnn_attention", {"position_weight": 1.5}, r"position_weight=1.5 .*\[0, 1\]"),
        ("convnn_attention", {"chunk_size": 0}, r"chunk_size=0"),
        ("kvt_attention", {"window": 3}, r"unknown option.*window"),
    ],
)
def test_bad_options_raise_value_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_layer(name, 12, 12, **options)


def test_too_many_neighbours_for_the_sequence_raise_before_computing():
    layer = build("kvt_attention", k=10)
    with pytest.raises(ValueError, match=r"k=10"):
        layer(tokens(n=9))
    sampled = build("convnn_attention", k=3, sampling="random", num_candidates=12)
    with pytest.raises(ValueError, match=r"r=12, N=9"):
        sampled(tokens(n=9))


# ViT-Tiny on CIFAR-10 (reference notes): 5,479,306 parameters with 12 attention slots of 4 * 192^2.
VIT_TINY_REST = 5_479_306 - 12 * 4 * 192**2


@pytest.mark.parametrize(
    ("name", "options", "per_layer", "vit_tiny"),
    [
        ("attention", {}, 4 * 192 * 192, 5_479_306),
        ("kvt_attention", {"k": 100}, 4 * 192 * 192, 5_479_306),
        ("sparse_attention", {}, 4 * 192 * 192, 5_479_306),
        ("local_attention", {}, 4 * 192 * 64, 4_299_658),
        ("local_attention", {"heads": 3}, 4 * 192 * 192, 5_479_306),
        ("convnn_attention", {}, 4 * 192 * 192 + 192 * 9, 5_500_042),
        (
            "convnn_attention",
            {"sampling": "random", "num_candidates": 32},
            4 * 192 * 192 + 192 * 9,
            5_500_042,
        ),
        ("convnn_attention", {"aggregation": "separable"}, 4 * 192 * 192 + 192 * 9 + 192 * 192, 5_942_410),
        ("convnn_attention", {"aggregation": "standard"}, 4 * 192 * 192 + 192 * 192 * 9, 9_460_618),
        ("convnn_attention", {"bias": True}, 4 * 192 * 192 + 192 * 9 + 192, 5_502_346),
        ("convnn_attention", {"projections": "identity"}, 192 * 192 + 192 * 9, None),
        ("convnn_attention", {"select_by": "both"}, 2 * 193 * 192 + 2 * 192 * 192 + 192 * 9, None),
    ],
)
def test_parameter_counts(name, options, per_layer, vit_tiny):
    count = sum(p.numel() for p in build_layer(name, 192, 192, **options).parameters())
    assert count == per_layer
    if vit_tiny is not None:
        assert VIT_TINY_REST + 12 * count == vit_tiny


@pytest.mark.parametrize("name", TOKEN_LAYERS)
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traceable_and_stateless_forward(name):
    layer = build(name, **({"dim_head": 4} if name == "local_attention" else {}))
    x = tokens()
    modules_before = len(list(layer.modules()))
    expected = layer(x)
    traced = torch.jit.trace(layer, (x,))
    assert len(list(layer.modules())) == modules_before
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-12)


def test_output_width_may_differ_from_input_width():
    for name in TOKEN_LAYERS:
        options = {"dim_head": 4} if name == "local_attention" else {}
        out = build_layer(name, 12, 20, **options).double()(tokens())
        assert out.shape == (2, 9, 20)

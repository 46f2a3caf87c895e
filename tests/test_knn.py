"""The k-NN core against independent references: torch's own ops, dense top-k, hand-made cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn import knn
from convnn.knn import (
    CandidateSampler,
    aggregate_neighbors,
    gather_neighbors,
    knn_select,
    modulate,
    random_candidates,
    reset_sampling,
    self_similarity,
    similarity,
    spatial_candidates,
)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_similarity_kinds_match_torch_references():
    q, k = rand(2, 5, 7), rand(2, 6, 7, seed=1)
    cos = F.cosine_similarity(q[:, :, None], k[:, None], dim=-1)
    torch.testing.assert_close(similarity(q, k, "cosine"), cos)
    torch.testing.assert_close(similarity(q, k, "dot"), q @ k.transpose(1, 2) / math.sqrt(7))
    torch.testing.assert_close(similarity(q, k, "euclidean"), -torch.cdist(q, k).pow(2))


def test_similarity_has_no_nan_on_zero_rows_and_no_positive_distance():
    q = torch.zeros(1, 3, 4)
    for kind in ("cosine", "dot", "euclidean"):
        s = similarity(q, q, kind)
        assert torch.isfinite(s).all() and (s == 0).all(), kind
    x = rand(1, 50, 3, dtype=torch.float32) * 1e3
    assert (similarity(x, x, "euclidean") <= 0).all()


def test_unknown_similarity_is_rejected():
    with pytest.raises(ValueError, match=r"similarity must be one of .*'euclidean'\], got 'l1'"):
        similarity(rand(1, 2, 3), rand(1, 2, 3), "l1")


def test_self_first_matches_reference_diagonal_trick():
    # The reference sets the cosine diagonal to 1.1 and takes top-k: self first, then the k-1 best.
    x = rand(3, 40, 6)
    s = similarity(x, x, "cosine")
    s.diagonal(dim1=1, dim2=2).fill_(1.1)
    ref_values, ref_idx = s.topk(9, dim=-1)
    values, idx = knn_select(x, x, 9, kind="cosine")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(values[..., 1:], ref_values[..., 1:])
    torch.testing.assert_close(values[..., 0], torch.ones(3, 40, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_without_self_first_equals_dense_topk(kind):
    q, k = rand(2, 30, 5), rand(2, 30, 5, seed=3)
    ref_values, ref_idx = similarity(q, k, kind).topk(4, dim=-1)
    values, idx = knn_select(q, k, 4, kind=kind, self_first=False)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(values, ref_values)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_unchunked(chunk):
    q, k = rand(2, 50, 5), rand(2, 50, 5, seed=2)
    cand = torch.tensor([3, 9, 10, 20, 31, 45, 49])
    for args in [dict(), dict(candidates=cand)]:
        keys = k if not args else k[:, cand]
        whole = knn_select(q, keys, 5, kind="dot", chunk_size=1000, **args)
        parts = knn_select(q, keys, 5, kind="dot", chunk_size=chunk, **args)
        assert torch.equal(whole[1], parts[1])
        torch.testing.assert_close(whole[0], parts[0])


def test_sampled_self_first_never_picks_self_twice():
    x = rand(2, 20, 4)
    cand = torch.arange(0, 20, 2)  # even tokens are their own candidates
    values, idx = knn_select(x, x[:, cand], 10, kind="cosine", candidates=cand)
    assert torch.equal(idx[..., 0], torch.arange(20).expand(2, 20))
    for row in idx.reshape(-1, 10):
        assert len(set(row.tolist())) == 10  # self once, then the 9 other candidates
        assert set(row[1:].tolist()) <= set(cand.tolist())
    torch.testing.assert_close(values[..., 0], torch.ones(2, 20, dtype=torch.float64))
    # k - 1 others must exist even for the tokens that are candidates themselves
    with pytest.raises(ValueError, match=r"k=11 neighbours need 1 <= k <= number of candidates \(10\)"):
        knn_select(x, x[:, cand], 11, candidates=cand)


def test_self_sim_overrides_the_self_value():
    x = rand(1, 8, 3)
    own = torch.full((1, 8), 0.25, dtype=torch.float64)
    values, _ = knn_select(x, x, 3, kind="dot", self_sim=own)
    assert (values[..., 0] == 0.25).all()
    torch.testing.assert_close(self_similarity(x, "dot"), similarity(x, x, "dot").diagonal(dim1=1, dim2=2))


def test_half_precision_masks_stay_finite():
    x = rand(2, 33, 8, dtype=torch.bfloat16)
    x[:, 5] = 0
    for kind in ("cosine", "dot", "euclidean"):
        values, idx = knn_select(x, x, 6, kind=kind, chunk_size=8)
        assert torch.isfinite(values).all() and values.dtype == torch.bfloat16, kind
        assert torch.isfinite(modulate(x.transpose(1, 2).repeat(1, 1, 6), values, "softmax")).all()


def test_random_candidates_are_distinct_and_reproducible():
    a = random_candidates(100, 32, torch.Generator().manual_seed(5))
    b = random_candidates(100, 32, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (32,) and a.unique().numel() == 32
    assert a.min() >= 0 and a.max() < 100
    with pytest.raises(ValueError, match="num_candidates <= N tokens, got r=101, N=100"):
        random_candidates(100, 101)


def test_spatial_grid_covers_the_real_pixels_not_the_padding():
    # a 3x7 map padded by 1 is 5x9; a 3x3 grid over the real pixels takes rows 1, 2, 3 and columns
    # 1 + linspace(0, 6, 3) = 1, 4, 7 of it, indexed with the padded width 9
    idx = spatial_candidates(45, 9, grid=(5, 9), padding=1)
    assert idx.tolist() == [10, 13, 16, 19, 22, 25, 28, 31, 34]
    assert spatial_candidates(45, 12, grid=(5, 9), padding=1).numel() == 9  # floor(sqrt(12)) = 3
    # VGG's first stage: 32x32 padded to 34x34, a 4x4 grid; linspace(0, 31, 4) = 0, 10.3, 20.7, 31 truncated
    grid = spatial_candidates(34 * 34, 16, grid=(34, 34), padding=1)
    assert grid[:4].tolist() == [34 + 1, 34 + 11, 34 + 21, 34 + 32]
    rows, cols = grid // 34, grid % 34
    assert rows.min() >= 1 and rows.max() <= 32 and cols.min() >= 1 and cols.max() <= 32  # no padding
    assert spatial_candidates(9, 4, grid=(3, 3)).tolist() == [0, 2, 6, 8]  # padding 0: the corners


def test_spatial_grid_larger_than_the_real_map_raises_unless_falling_back():
    with pytest.raises(ValueError, match=r"a 4x4 spatial grid \(num_candidates=16\) exceeds the 3x7 map"):
        spatial_candidates(45, 16, grid=(5, 9), padding=1)
    spatial = CandidateSampler("spatial", 16)
    with pytest.raises(ValueError, match="set fallback_to_all=true"):
        spatial.candidates(45, grid=(5, 9), padding=1)
    assert (
        CandidateSampler("spatial", 16, fallback_to_all=True).candidates(45, grid=(5, 9), padding=1) is None
    )
    fits = CandidateSampler("spatial", 9, fallback_to_all=True).candidates(45, grid=(5, 9), padding=1)
    assert fits.tolist() == spatial_candidates(45, 9, grid=(5, 9), padding=1).tolist()
    assert CandidateSampler("random", 50, fallback_to_all=True).candidates(49) is None
    assert CandidateSampler("random", 49, fallback_to_all=True).candidates(49).sort().values.tolist() == list(
        range(49)
    )
    with pytest.raises(ValueError, match="got r=50, N=49"):
        CandidateSampler("random", 50).candidates(49)


def test_spatial_sequence_is_the_truncated_linspace():
    # the reference: linspace(0, N - 1, r) truncated; for N = 197, r = 32 it starts 0, 6, 12, 18, 25, 31
    idx = spatial_candidates(197, 32)
    assert idx.tolist() == [int(i * 196 / 31) for i in range(32)]
    assert idx[:6].tolist() == [0, 6, 12, 18, 25, 31] and idx[-1] == 196
    assert spatial_candidates(5, 5).tolist() == [0, 1, 2, 3, 4]  # r = N: every token once


def test_gather_neighbors_matches_a_loop():
    v, idx = rand(2, 3, 6), torch.randint(0, 6, (2, 6, 4))
    out = gather_neighbors(v, idx)
    for b in range(2):
        for i in range(6):
            for j in range(4):
                assert torch.equal(out[b, :, i * 4 + j], v[b, :, idx[b, i, j]])


def test_gather_works_on_a_transposed_token_view():
    tokens = rand(2, 6, 3)  # [B, N, D]
    idx = torch.randint(0, 6, (2, 6, 4))
    out = gather_neighbors(tokens.transpose(1, 2), idx)
    assert torch.equal(out, gather_neighbors(tokens.transpose(1, 2).contiguous(), idx))


def test_modulate_ones_is_identity_and_softmax_weights_rows():
    rows, values = rand(2, 3, 8), rand(2, 4, 2)
    assert modulate(rows, values, "ones") is rows
    w = values.softmax(-1).reshape(2, 1, 8)
    torch.testing.assert_close(modulate(rows, values, "softmax"), rows * w)
    with pytest.raises(ValueError, match=r"rho must be one of \['ones', 'softmax'\], got 'max'"):
        modulate(rows, values, "max")


def test_sampler_eval_is_reproducible_after_reset_and_train_uses_global_rng():
    model = nn.Sequential(CandidateSampler("random", 8), nn.ReLU(), CandidateSampler("random", 8))
    model.eval()
    assert reset_sampling(model, seed=1) == 2
    first = [m.candidates(50) for m in (model[0], model[2])]
    assert not torch.equal(first[0], first[1])  # per-layer seeds differ
    reset_sampling(model, seed=1)
    assert all(torch.equal(a, m.candidates(50)) for a, m in zip(first, (model[0], model[2]), strict=True))
    model.train()
    torch.manual_seed(3)
    a = model[0].candidates(50)
    torch.manual_seed(3)
    assert torch.equal(a, model[0].candidates(50))


def test_sampler_options_are_validated():
    with pytest.raises(ValueError, match=r"sampling must be one of .*'spatial'\], got 'grid'"):
        CandidateSampler("grid")
    with pytest.raises(ValueError, match="sampling='random' needs a positive num_candidates, got None"):
        CandidateSampler("random")
    assert CandidateSampler("all", 32).candidates(10) is None


def test_select_rejects_bad_arguments():
    x = rand(1, 5, 2)
    with pytest.raises(ValueError, match=r"k=6 neighbours need 1 <= k <= number of candidates \(5\)"):
        knn_select(x, x, 6)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None, got 0"):
        knn_select(x, x, 2, chunk_size=0)
    with pytest.raises(ValueError, match="keys must cover all 5 tokens, got 3"):
        knn_select(x, x[:, :3], 2)


@pytest.mark.parametrize(("rho", "groups", "out"), [("ones", 1, 5), ("softmax", 1, 5), ("softmax", 3, 6)])
def test_aggregate_neighbors_equals_gather_modulate_conv(rho, groups, out):
    v, values = rand(2, 3, 7), rand(2, 7, 4, seed=1)
    idx = torch.randint(0, 7, (2, 7, 4), generator=torch.Generator().manual_seed(2))
    conv = nn.Conv1d(3, out, 4, stride=4, groups=groups).double()
    ref = conv(modulate(gather_neighbors(v, idx), values, rho))
    torch.testing.assert_close(aggregate_neighbors(v, idx, values, rho, conv), ref)
    with pytest.raises(ValueError, match=r"conv needs kernel_size = stride = k = 3, got \(4, 4\)"):
        aggregate_neighbors(v, idx[..., :3], values[..., :3], rho, conv)


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("sampled", [False, True])
def test_recomputed_values_match_selection_and_have_exact_gradients(kind, sampled):
    q, k = rand(1, 12, 3).requires_grad_(), rand(1, 12, 3, seed=4).requires_grad_()
    cand = torch.tensor([0, 2, 5, 7, 8, 11]) if sampled else None

    def values(q, k):
        keys = k if cand is None else k[:, cand]
        return knn_select(q, keys, 4, kind=kind, candidates=cand, self_first=not sampled)[0]

    with torch.no_grad():
        plain = values(q, k)
    torch.testing.assert_close(values(q, k), plain)
    assert torch.autograd.gradcheck(values, (q, k))


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_queries_taken_from_shared_rows_equal_their_copy(kind):
    """``q is k`` with ``queries``: the query rows are taken from the rows prepared once; selection,
    values and gradients equal passing the copied query rows."""
    x = rand(2, 30, 5).requires_grad_()
    ids = torch.tensor([4, 5, 6, 10, 11, 12, 16, 17, 29, 0])

    def select(x, shared):
        return knn_select(x if shared else x[:, ids], x, 4, kind=kind, queries=ids, chunk_size=3)

    values, idx = select(x, True)
    ref_values, ref_idx = select(x, False)
    assert idx.shape == (2, 10, 4) and torch.equal(idx, ref_idx)
    assert torch.equal(idx[..., 0], ids.expand(2, -1))
    torch.testing.assert_close(values, ref_values)
    assert torch.autograd.gradcheck(lambda x: select(x, True)[0], (x,))


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_selected_pairs_gradient_equals_the_dense_chunk_gradient(kind, monkeypatch):
    """The values' backward on CPU walks only the selected pairs (in query steps; keys shared by many
    queries added in order); it equals the dense ``[B, chunk, M]`` backward other devices run, and
    a float64 reference by autograd through the dense similarity."""
    q, k = rand(2, 40, 6).requires_grad_(), rand(2, 40, 6, seed=7).requires_grad_()
    positions = torch.stack(
        [torch.randperm(40, generator=torch.Generator().manual_seed(i))[:4] for i in range(80)]
    )
    positions = positions.view(2, 40, 4)
    grad = rand(2, 40, 4, seed=8)
    monkeypatch.setattr(knn.ops, "STEP_ELEMENTS", 2 * 4 * 6 * 3)  # steps of 3 queries
    sparse = knn.ops._selected_pairs_grad(q, k, positions, grad, kind)
    dense = knn.ops._dense_pairs_grad(q, k, positions, grad, kind, 16)
    pairs = knn.prepared_similarity(q, k, kind).gather(2, positions)
    scale = math.sqrt(6) if kind == "dot" else 1.0  # dot's gradient reaches them already divided by it
    reference = torch.autograd.grad(pairs, (q, k), grad * scale)
    for got, want, ref in zip(sparse, dense, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_one_self_first_neighbour_among_samples_backpropagates():
    q = rand(2, 6, 3).requires_grad_()
    cand = torch.tensor([1, 4])
    values, idx = knn_select(q, q[:, cand], 1, candidates=cand)
    assert idx.shape == (2, 6, 1) and torch.equal(idx[..., 0], torch.arange(6).expand(2, 6))
    values.sum().backward()
    assert torch.isfinite(q.grad).all()

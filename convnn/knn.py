"""The k-NN core shared by every ConvNN layer: similarity, candidate sets, chunked top-k, gather, rho.

Everything works on token sequences ``[B, N, h]``; a feature map ``[B, C, H, W]`` enters as its
``H * W`` tokens in raster order (``x.flatten(2).transpose(1, 2)``), and only candidate sampling needs
to know the map's ``(H, W)`` (the spatial grid).

The usual pipeline of a layer::

    cand = sampler.candidates(n, grid=(h, w), device=x.device)       # None or LongTensor [M]
    values, idx = knn_select(q, k_cand, num_neighbors, kind="cosine", candidates=cand)
    out = aggregate_neighbors(v, idx, values, rho, aggregate)         # [B, C', N]

where ``aggregate`` is the layer's ``Conv1d(kernel k, stride k)``; :func:`aggregate_neighbors` equals
``aggregate(modulate(gather_neighbors(v, idx), values, rho))`` (both steps are public too).

Design choices the tests pin down:

* similarity and top-k run in query chunks, so peak extra memory is O(B * chunk * M + B * N * k)
  instead of the dense ``[B, N, N]`` matrix;
* the neighbour rows are gathered through an expanded *view* of the index, never from an expanded
  ``[B, C, N, k]`` copy of the input; the only ``C * k * N`` tensor is the gathered result itself,
  and in training (``rho="ones"``) not even that: :class:`GatherAggregate` works in token steps;
* selection runs without autograd; gradients of the selected similarities (rho softmax) flow through
  the selected pairs only (:class:`SelectedSimilarity`);
* ``rho="ones"`` does no multiplication at all, and masks use the dtype's finite minimum, so nothing
  overflows in bf16 / fp16;
* random candidates come from a ``torch.Generator`` when one is given. :class:`CandidateSampler` holds
  one per layer for evaluation; :func:`reset_sampling` re-seeds them all, so test metrics with random
  sampling are reproducible, while training draws from the global RNG (seeded by Lightning's
  ``seed_everything``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIMILARITIES = ("cosine", "dot", "euclidean")
SAMPLINGS = ("all", "random", "spatial")
RHOS = ("ones", "softmax")

#: Target number of similarity entries per chunk when ``chunk_size`` is None (16 MiB in float32).
AUTO_CHUNK_ELEMENTS = 1 << 22


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming ``value`` and the ``allowed`` ones unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def prepare(x: Tensor, kind: str) -> Tensor:
    """Rows ready for a plain matmul: ``[B, N, h] -> [B, N, h]`` (l2-normalised rows for cosine).

    Zero rows stay zero (``F.normalize`` clamps the norm), so they get similarity 0, never NaN.
    """
    check_choice("similarity", kind, SIMILARITIES)
    return F.normalize(x, dim=-1) if kind == "cosine" else x


def prepared_similarity(q: Tensor, k: Tensor, kind: str) -> Tensor:
    """Similarity of :func:`prepare`-d rows: ``q [B, Nq, h]``, ``k [B, M, h] -> [B, Nq, M]``.

    cosine: ``q k^T``; dot: ``q k^T / sqrt(h)`` (as attention); euclidean: ``-|q - k|^2`` expanded as
    ``2 q k^T - |q|^2 - |k|^2`` and clamped to ``<= 0``, so rounding never yields a negative squared
    distance. Larger is always more similar.
    """
    scores = torch.matmul(q, k.transpose(-1, -2))
    if kind == "dot":
        return scores / math.sqrt(q.shape[-1])
    if kind == "euclidean":
        q_sq = q.pow(2).sum(-1, keepdim=True)
        k_sq = k.pow(2).sum(-1).unsqueeze(-2)
        return (2 * scores - q_sq - k_sq).clamp(max=0)
    return scores


def similarity(q: Tensor, k: Tensor, kind: str) -> Tensor:
    """Similarity of every query with every key: ``q [B, Nq, h]``, ``k [B, M, h] -> [B, Nq, M]``.

    ``kind`` is "cosine" (rows l2-normalised, zero rows give 0), "dot" (scaled by ``1 / sqrt(h)``) or
    "euclidean" (negative squared distance, ``<= 0``).
    """
    return prepared_similarity(prepare(q, kind), prepare(k, kind), kind)


def self_similarity(q: Tensor, kind: str) -> Tensor:
    """Similarity of each row with itself, ``[B, N, h] -> [B, N]``, without a matmul.

    It is the self entry's value when queries and keys are the same tensor (identity projections):
    cosine 1 (0 for a zero row), dot ``|q|^2 / sqrt(h)``, euclidean 0.
    """
    check_choice("similarity", kind, SIMILARITIES)
    norm = torch.linalg.vector_norm(q, dim=-1)
    if kind == "cosine":
        return (norm > 0).to(q.dtype)
    if kind == "dot":
        return norm.pow(2) / math.sqrt(q.shape[-1])
    return torch.zeros_like(norm)


def pair_similarity(q: Tensor, k: Tensor, kind: str) -> Tensor:
    """Similarity of matching rows, ``q [B, N, h]``, ``k [B, N, h] -> [B, N]`` (``q_i`` with ``k_i``)."""
    if kind == "euclidean":
        return -(q - k).pow(2).sum(-1)
    scores = (prepare(q, kind) * prepare(k, kind)).sum(-1)
    return scores / math.sqrt(q.shape[-1]) if kind == "dot" else scores


def random_candidates(n: int, r: int, generator: torch.Generator | None = None) -> Tensor:
    """``r`` distinct token indices drawn uniformly from ``range(n)`` -> LongTensor ``[r]`` (CPU).

    Draws from ``generator`` when given, else from the global RNG.
    """
    if not 1 <= r <= n:
        raise ValueError(f"random sampling needs 1 <= num_candidates <= N tokens, got r={r}, N={n}")
    return torch.randperm(n, generator=generator)[:r]


def spatial_candidates(n: int, r: int, grid: tuple[int, int] | None = None, padding: int = 0) -> Tensor:
    """A regular candidate set -> LongTensor ``[M]`` of token indices (CPU), as the reference builds it.

    Sequences (``grid`` None): ``linspace(0, n - 1, r)`` truncated to int (``M = r``; for n = 197,
    r = 32: 0, 6, 12, 18, 25, ..., 196). Maps (``grid = (H, W)`` of the map the tokens come from,
    ``padding`` included on every side): a ``g x g`` grid with ``g = floor(sqrt(r))`` over the real
    pixels only, rows ``padding + linspace(0, H - 1 - 2 padding, g)`` and columns alike, truncated,
    indices ``row * W + col`` (``M = g * g``). A grid with more rows or columns than the real map
    raises (see :class:`CandidateSampler`'s ``fallback_to_all``).
    """
    if grid is None:
        if not 1 <= r <= n:
            raise ValueError(f"spatial sampling needs 1 <= num_candidates <= N tokens, got r={r}, N={n}")
        return torch.linspace(0, n - 1, r, dtype=torch.float64).long()
    height, width = grid
    if height * width != n:
        raise ValueError(f"grid {grid} does not hold the {n} tokens")
    g = math.isqrt(r)
    if g < 1:
        raise ValueError(f"spatial sampling needs num_candidates >= 1, got r={r}")
    real_h, real_w = height - 2 * padding, width - 2 * padding
    if g > min(real_h, real_w):
        raise ValueError(
            f"a {g}x{g} spatial grid (num_candidates={r}) exceeds the {real_h}x{real_w} map; "
            "set fallback_to_all=true to use all candidates on such maps"
        )
    rows = padding + torch.linspace(0, real_h - 1, g, dtype=torch.float64).long()
    cols = padding + torch.linspace(0, real_w - 1, g, dtype=torch.float64).long()
    return (rows[:, None] * width + cols[None, :]).flatten()


def fits(sampling: str, n: int, r: int, grid: tuple[int, int] | None, padding: int) -> bool:
    """Whether ``r`` random candidates (``r <= n``) or a spatial ``floor(sqrt(r))`` grid (a sequence:
    ``r <= n``; a map: the grid's side <= the real map's height and width) fit the ``n`` tokens."""
    if sampling == "random" or grid is None:
        return r <= n
    return math.isqrt(r) <= min(grid) - 2 * padding


def _auto_chunk(batch: int, m: int) -> int:
    """Queries per chunk so one chunk of similarities holds about :data:`AUTO_CHUNK_ELEMENTS`."""
    return max(1, AUTO_CHUNK_ELEMENTS // max(1, batch * m))


def knn_select(
    q: Tensor,
    k: Tensor,
    num_neighbors: int,
    *,
    kind: str = "cosine",
    candidates: Tensor | None = None,
    self_first: bool = True,
    self_sim: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``num_neighbors`` most similar keys of every query, computed in query chunks.

    Args:
        q: queries of all N tokens ``[B, N, h]``.
        k: keys ``[B, M, h]``: of all N tokens in order when ``candidates`` is None, else of the
            candidate tokens ``candidates`` (``M = len(candidates)``).
        num_neighbors: k, the neighbours per token (the token itself included when ``self_first``).
        kind: "cosine", "dot" or "euclidean" (see :func:`similarity`).
        candidates: None (all tokens are candidates) or LongTensor ``[M]`` of token indices, shared
            by the batch.
        self_first: True: each token is its own first neighbour, then the ``k - 1`` best *other*
            candidates (its own candidate entry is masked out, so it is never picked twice). False:
            the token competes like any other candidate.
        self_sim: ``[B, N]`` value reported for the self entry when ``self_first``; by default the
            diagonal of the similarity when all tokens are candidates, else :func:`self_similarity`
            of ``q`` (exact when queries and keys share their projection).
        chunk_size: queries per chunk; None picks one so a chunk holds about 4M similarities. Peak
            extra memory is O(B * chunk * M + B * N * k).

    Returns:
        ``(values [B, N, k], indices [B, N, k])``: similarities and token indices (into the N
        tokens), best first (self first when ``self_first``).

    The selection itself runs without autograd. When ``q`` or ``k`` need gradients, the values of
    the selected pairs are recomputed from the gathered keys, so the backward costs O(N * k * h)
    instead of the dense O(N * M * h) of differentiating the similarity matrix.
    """
    batch, n, _ = q.shape
    m = k.shape[1]
    if candidates is None and m != n:
        raise ValueError(f"without candidates the keys must cover all {n} tokens, got {m}")
    if candidates is not None and candidates.shape != (m,):
        raise ValueError(f"candidates must be a LongTensor [{m}] (1 per key), got {tuple(candidates.shape)}")
    if not 1 <= num_neighbors <= m:
        raise ValueError(f"k={num_neighbors} neighbours need 1 <= k <= number of candidates ({m})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    chunk = chunk_size or _auto_chunk(batch, m)
    shared = k is q
    q = prepare(q, kind).contiguous()
    k = q if shared else prepare(k, kind).contiguous()
    picks = num_neighbors - 1 if self_first else num_neighbors
    if candidates is not None:
        candidates = candidates.to(q.device)
    with torch.no_grad():
        values, positions, own = _select(q, k, picks, kind, candidates, self_first, chunk)
    self_ids = torch.arange(n, device=q.device).expand(batch, n).unsqueeze(-1)
    if own is not None and self_sim is None:  # all candidates: the self value is a similarity entry too
        positions = torch.cat([self_ids, positions], dim=-1)
        values = torch.cat([own.unsqueeze(-1), values], dim=-1)
    values = SelectedSimilarity.apply(q, k, positions, values, kind)
    indices = positions if candidates is None else candidates[positions]
    if not self_first or (own is not None and self_sim is None):
        return values, indices
    if self_sim is None:
        self_sim = self_similarity(q, kind)
    values = torch.cat([self_sim.unsqueeze(-1).to(values.dtype), values], dim=-1)
    return values, torch.cat([self_ids, indices], dim=-1)


def _select(
    q: Tensor, k: Tensor, picks: int, kind: str, candidates: Tensor | None, self_first: bool, chunk: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunked top-``picks`` of prepared rows -> ``(values, positions into k [B, N, picks], own)``.

    ``own`` is the similarity of each token with itself ``[B, N]`` (all candidates with
    ``self_first``), else None. With ``self_first`` the token's own candidate entry is masked out.
    """
    n = q.shape[1]
    self_pos = _self_positions(n, candidates) if self_first and candidates is not None else None
    values, positions, own = [], [], []
    for start, q_chunk in zip(range(0, n, chunk), q.split(chunk, dim=1), strict=True):
        stop = start + q_chunk.shape[1]
        scores = prepared_similarity(q_chunk, k, kind)
        lowest = torch.finfo(scores.dtype).min
        if self_first and self_pos is None:
            diagonal = scores.diagonal(offset=start, dim1=1, dim2=2)
            own.append(diagonal.clone())
            diagonal.fill_(lowest)
        elif self_first:
            cols = self_pos[start:stop]
            rows = torch.arange(stop - start, device=q.device)[cols >= 0]
            scores[:, rows, cols[cols >= 0]] = lowest
        top_values, top_pos = scores.topk(picks, dim=-1)
        values.append(top_values)
        positions.append(top_pos)
    return torch.cat(values, dim=1), torch.cat(positions, dim=1), torch.cat(own, dim=1) if own else None


class SelectedSimilarity(torch.autograd.Function):
    """The similarities of selected pairs, differentiable without storing any similarity matrix.

    Forward returns ``values [B, N, p]`` (already computed by the selection, without autograd) for the
    pairs ``(i, positions[b, i, j])`` of prepared rows ``q [B, N, h]``, ``k [B, M, h]``; nothing is
    stored beyond ``q``, ``k`` and the positions. Backward rebuilds the gradient one query chunk at a
    time as a ``[B, chunk, M]`` matrix that is zero outside the selected pairs and applies it with two
    batched matmuls (on CPU far faster than scattering ``N * p`` rows of ``h`` values).
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, positions: Tensor, values: Tensor, kind: str) -> Tensor:
        return values.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, positions, _, kind = inputs
        ctx.save_for_backward(q, k, positions)
        ctx.kind = kind

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, positions = ctx.saved_tensors
        batch, n, _ = positions.shape
        m, h = k.shape[1:]
        grad = grad.to(q.dtype) / math.sqrt(h) if ctx.kind == "dot" else grad.to(q.dtype)
        grad_q, grad_k = torch.empty_like(q), torch.zeros_like(k)
        chunk = _auto_chunk(batch, m)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            # the chunk's gradient as a [B, c, M] matrix, nonzero at the selected pairs only
            g = q.new_zeros(batch, stop - start, m)
            g.scatter_add_(2, positions[:, start:stop], grad[:, start:stop])
            q_rows = q[:, start:stop]
            grad_q[:, start:stop] = g @ k
            grad_k += g.transpose(1, 2) @ q_rows
            if ctx.kind == "euclidean":  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
                grad_q[:, start:stop] = 2 * grad_q[:, start:stop] - 2 * q_rows * g.sum(-1, keepdim=True)
                grad_k -= k * g.sum(1).unsqueeze(-1)
        if ctx.kind == "euclidean":
            grad_k *= 2
        return grad_q, grad_k, None, None, None


def _self_positions(n: int, candidates: Tensor) -> Tensor:
    """Where each of the n tokens sits in ``candidates`` -> LongTensor ``[n]`` (-1: not a candidate)."""
    where = torch.full((n,), -1, dtype=torch.long, device=candidates.device)
    where[candidates] = torch.arange(candidates.numel(), device=candidates.device)
    return where


def nearest_by_place(
    place: Tensor,
    num_neighbors: int,
    *,
    candidates: Tensor | None = None,
    self_first: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k candidates nearest in position, sorted by token index (raster / sequence order).

    ``place [1, N, c]``: each token's coordinates (float32, e.g. pixel (row, col) or sequence index).
    Returns ``(values, indices) [1, N, k]`` as :func:`knn_select` with euclidean similarity
    (``-distance^2``), reordered by index. Runs outside autocast so integer coordinates stay exact.
    """
    keys = place if candidates is None else place[:, candidates]
    with torch.autocast(place.device.type, enabled=False):
        values, indices = knn_select(
            place,
            keys,
            num_neighbors,
            kind="euclidean",
            candidates=candidates,
            self_first=self_first,
            chunk_size=chunk_size,
        )
    indices, order = indices.sort(dim=-1)
    return values.gather(-1, order), indices


def gather_neighbors(v: Tensor, indices: Tensor) -> Tensor:
    """Neighbour rows in Conv1d layout: ``v [B, C, N]``, ``indices [B, N', k] -> [B, C, N' * k]``.

    ``out[b, :, i * k + j] = v[b, :, indices[b, i, j]]``. The index is broadcast over channels as an
    expanded view, so the only new tensor is the output itself.
    """
    batch, channels, _ = v.shape
    flat = indices.reshape(batch, 1, -1).expand(batch, channels, -1)
    return v.gather(2, flat)


def modulate(neighbors: Tensor, values: Tensor, rho: str) -> Tensor:
    """Scale the gathered rows ``[B, C, N * k]`` by ``rho(values [B, N, k])``.

    "ones" returns ``neighbors`` untouched (no multiplication); "softmax" multiplies each row by the
    softmax of its token's k values.
    """
    check_choice("rho", rho, RHOS)
    if rho == "ones":
        return neighbors
    weights = values.softmax(dim=-1).to(neighbors.dtype)
    return neighbors * weights.reshape(weights.shape[0], 1, -1)


def aggregate_neighbors(v: Tensor, indices: Tensor, values: Tensor, rho: str, conv: nn.Conv1d) -> Tensor:
    """Gather, modulate and aggregate in one step: ``v [B, C, N]``, ``indices [B, N', k] -> [B, C', N']``.

    Equals ``conv(modulate(gather_neighbors(v, indices), values, rho))`` for a ``conv`` with kernel
    and stride k, but folds the batch into the length and gathers into the ``[1, C * k, B * N']``
    layout, then applies ``conv``'s own weight as the equivalent 1x1 convolution, which CPU and GPU
    kernels run faster. With ``rho="ones"`` and gradients on, :class:`GatherAggregate` runs the same
    ops in token steps without keeping the gathered rows. Parameters and the Conv1d op (and so every
    FLOP counter) are unchanged.
    """
    check_choice("rho", rho, RHOS)
    batch, channels, _ = v.shape
    k = indices.shape[-1]
    if conv.kernel_size != (k,) or conv.stride != (k,):
        got = (conv.kernel_size[0], conv.stride[0])
        raise ValueError(f"conv needs kernel_size = stride = k = {k}, got {got}")
    tokens, m = indices.shape[1], v.shape[2]
    # the batch folds into the length: token b * N' + i of the folded map is token i of image b
    flat = indices + torch.arange(batch, device=indices.device).view(batch, 1, 1) * m
    flat = flat.permute(2, 0, 1).reshape(k, -1)
    v_flat = v.transpose(0, 1).reshape(channels, -1)
    weight = conv.weight.reshape(conv.out_channels, -1, 1)
    if rho == "ones" and _fused_applies(v_flat, weight, conv.groups):
        out = GatherAggregate.apply(v_flat, flat, weight, conv.bias)
    else:
        rows = gather_rows(v_flat, flat)
        if rho == "softmax":
            weights = values.softmax(dim=-1).to(rows.dtype).permute(2, 0, 1).reshape(1, k, -1)
            rows = (rows.view(channels, k, -1) * weights).view(channels * k, -1)
        out = F.conv1d(rows.unsqueeze(0), weight, conv.bias, groups=conv.groups)
    return out.view(-1, batch, tokens).transpose(0, 1).contiguous()


def gather_rows(v_flat: Tensor, flat: Tensor) -> Tensor:
    """Gathered rows: ``v_flat [C, L]``, token indices ``flat [k, T]`` -> ``[C * k, T]``.

    Row ``c * k + j`` is ``v_flat[c, flat[j]]``; the index is broadcast over channels as an expanded
    view, so the output is the only new tensor.
    """
    channels, (k, tokens) = v_flat.shape[0], flat.shape
    return v_flat.gather(1, flat.reshape(1, -1).expand(channels, -1)).view(channels * k, tokens)


def _fused_applies(v_flat: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether :class:`GatherAggregate` may stand in for gather + ``F.conv1d``: a dense (groups 1)
    aggregation that needs gradients, outside autocast and outside tracing (traced graphs keep the
    plain ops)."""
    return (
        groups == 1
        and torch.is_grad_enabled()
        and (v_flat.requires_grad or weight.requires_grad)
        and v_flat.dtype == weight.dtype
        and not torch.is_autocast_enabled(v_flat.device.type)
        and not torch.jit.is_tracing()
    )


#: Tokens per step of :class:`GatherAggregate` (its temporaries are ``[C * k, STEP_TOKENS]``).
STEP_TOKENS = 2048


class GatherAggregate(torch.autograd.Function):
    """``F.conv1d(gather_rows(v_flat, flat)[None], weight, bias) -> [1, C', T]`` without the full rows.

    The same gather and Conv1d ops as the plain path (so profilers see the same ops and the same
    FLOPs), run over the T tokens in steps of :data:`STEP_TOKENS`, so the ``[C * k, T]`` gathered rows
    never exist at once; only ``v_flat [C, L]`` and ``flat [k, T]`` are saved. The backward walks the
    same steps: it re-gathers a step's rows for the weight gradient and scatters ``weight^T @ grad``
    into ``v_flat``'s gradient. All temporaries are ``[C * k, STEP_TOKENS]`` and stay in cache, which on
    CPU is much faster than the conv's and the gather's own backward over the full rows.
    """

    @staticmethod
    def forward(v_flat: Tensor, flat: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        tokens = flat.shape[1]
        out = v_flat.new_empty(1, weight.shape[0], tokens)
        for start in range(0, tokens, STEP_TOKENS):
            rows = gather_rows(v_flat, flat[:, start : start + STEP_TOKENS])
            out[:, :, start : start + STEP_TOKENS] = F.conv1d(rows.unsqueeze(0), weight, bias)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        v_flat, flat, weight, _ = inputs
        ctx.save_for_backward(v_flat, flat, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        v_flat, flat, weight = ctx.saved_tensors
        channels, grad = v_flat.shape[0], grad[0]
        w = weight.squeeze(-1)
        grad_v = torch.zeros_like(v_flat) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[2] else None
        for start in range(0, flat.shape[1], STEP_TOKENS):
            step_grad = grad[:, start : start + STEP_TOKENS]
            step_flat = flat[:, start : start + STEP_TOKENS]
            if grad_w is not None:
                grad_w.addmm_(step_grad, gather_rows(v_flat, step_flat).t())
            if grad_v is not None:
                index = step_flat.reshape(1, -1).expand(channels, -1)
                grad_v.scatter_add_(1, index, (w.t() @ step_grad).view(channels, -1))
        grad_b = grad.sum(1) if ctx.needs_input_grad[3] else None
        return grad_v, None, None if grad_w is None else grad_w.unsqueeze(-1), grad_b


class CandidateSampler(nn.Module):
    """Which tokens are candidate neighbours: "all", "random" (``num_candidates`` r) or "spatial".

    ``num_candidates`` is required for "random" / "spatial" and ignored by "all" (so a sweep over
    ``sampling`` can keep one r). A map's spatial grid is ``floor(sqrt(r)) x floor(sqrt(r))``, so the
    paper's Figure 5 "r" (r^2 random candidates or an r x r grid) is ``num_candidates = r^2``.

    ``fallback_to_all``: when r exceeds the tokens (random) or the grid's side exceeds the real map's
    (spatial), use all candidates (each token its own first neighbour) instead of raising, as the
    paper's Figure 5 runs did on VGG-11's small late-stage maps. Off by default: never silent.

    In training mode random candidates are drawn from the global RNG (reproducible through
    ``seed_everything``); in eval mode from this module's own ``generator``, which
    :func:`reset_sampling` re-seeds at the start of every validation / test epoch.
    """

    def __init__(
        self, sampling: str = "all", num_candidates: int | None = None, fallback_to_all: bool = False
    ) -> None:
        super().__init__()
        check_choice("sampling", sampling, SAMPLINGS)
        if sampling != "all" and (num_candidates is None or num_candidates < 1):
            raise ValueError(f"sampling={sampling!r} needs a positive num_candidates, got {num_candidates}")
        self.sampling = sampling
        self.num_candidates = num_candidates
        self.fallback_to_all = fallback_to_all
        self.generator = torch.Generator().manual_seed(0)

    def candidates(
        self,
        n: int,
        grid: tuple[int, int] | None = None,
        device: torch.device | None = None,
        padding: int = 0,
    ) -> Tensor | None:
        """Candidate token indices for ``n`` tokens: None for all, else LongTensor ``[M]`` on ``device``.

        ``grid = (H, W)`` marks the tokens as a map (``padding`` zero rows / columns on every side,
        left out of the spatial grid); None = a sequence.
        """
        if self.sampling == "all":
            return None
        if self.fallback_to_all and not fits(self.sampling, n, self.num_candidates, grid, padding):
            return None
        if self.sampling == "random":
            generator = None if self.training else self.generator
            return random_candidates(n, self.num_candidates, generator).to(device)
        return spatial_candidates(n, self.num_candidates, grid, padding).to(device)

    def extra_repr(self) -> str:
        fallback = ", fallback_to_all=True" if self.fallback_to_all else ""
        return f"sampling={self.sampling!r}, num_candidates={self.num_candidates}{fallback}"


def reset_sampling(model: nn.Module, seed: int) -> int:
    """Re-seed every :class:`CandidateSampler` in ``model``; returns how many there are.

    The i-th sampler (in ``model.modules()`` order) gets seed ``seed * 100003 + i``, so evaluation
    with random candidates is the same whenever it starts from the same ``seed``.
    """
    samplers = [m for m in model.modules() if isinstance(m, CandidateSampler)]
    for index, sampler in enumerate(samplers):
        sampler.generator.manual_seed((seed * 100003 + index) % (1 << 63))
    return len(samplers)

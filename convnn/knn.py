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

* similarity and top-k run in chunks sized per device (cache-sized on CPU, one chunk on CUDA when
  memory allows; under ``torch.compile`` the chunked selection is one opaque op), so peak extra
  memory is O(B * chunk * M + B * N * k) instead of the dense ``[B, N, N]`` matrix; the selection
  runs in float32 also under autocast; on CPU the scores come from oneDNN and the top-k from the
  native kernel (:mod:`convnn.native`);
* neighbour rows are gathered whole with ``index_select`` from the token-major ``[B * N, C]`` rows
  (backward: ``index_add_``, deterministic under ``torch.use_deterministic_algorithms``; on CPU the
  native :func:`~convnn.native.index_add_rows`, deterministic always), never from
  an expanded ``[B, C, N, k]`` copy; in training on CPU (``rho="ones"``) not even the gathered rows
  exist at once: :func:`gather_aggregate` (and :func:`gather_scaled_sum` for the depthwise, rho-weighted
  sum of ConvNN-attention) works in cache-sized token steps;
* selection runs without autograd; gradients of the selected similarities (rho softmax) flow through
  the selected pairs only (:class:`SelectedSimilarity`);
* ``rho="ones"`` does no multiplication at all, and masks use the dtype's finite minimum, so nothing
  overflows in bf16 / fp16;
* nothing synchronises with the host: random candidates are drawn on the input's device (training:
  the global RNG, seeded by Lightning's ``seed_everything``; evaluation: :class:`CandidateSampler`'s
  generator for that device, re-seeded by :func:`reset_sampling`, so test metrics with random
  sampling are reproducible), spatial ones are cached per shape and device, masks use
  ``masked_fill`` / ``scatter_``, never boolean indexing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.native import index_add_rows, topk_last

SIMILARITIES = ("cosine", "dot", "euclidean")
SAMPLINGS = ("all", "random", "spatial")
RHOS = ("ones", "softmax")

#: Similarity entries per chunk on CPU when ``chunk_size`` is None (2 MiB of float32: the chunk of
#: scores stays in the core's cache for the top-k that reads it again).
AUTO_CHUNK_ELEMENTS = 1 << 19


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


def random_candidates(
    n: int, r: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> Tensor:
    """``r`` distinct token indices drawn uniformly from ``range(n)`` -> LongTensor ``[r]`` on ``device``.

    Drawn on ``device`` itself (the ``r`` largest of ``n`` uniform keys: no host round trip, no sync,
    capturable by CUDA graphs and ``torch.compile``), from ``generator`` (on that device) when given,
    else from the global RNG.
    """
    if not 1 <= r <= n:
        raise ValueError(f"random sampling needs 1 <= num_candidates <= N tokens, got r={r}, N={n}")
    keys = (
        torch.rand(n, device=device)
        if generator is None
        else torch.rand(n, generator=generator, device=device)
    )
    return keys.topk(r).indices


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


#: Similarity elements per chunk on devices other than the CPU, when free memory is unknown.
DEVICE_CHUNK_ELEMENTS = 1 << 28


def _auto_chunk(batch: int, n: int, m: int, device: torch.device) -> tuple[int, int]:
    """``(queries, images)`` per chunk of a ``[images, queries, m]`` similarity, sized for ``device``.

    CPU: about :data:`AUTO_CHUNK_ELEMENTS` entries, queries of one image first (the chunk and its
    top-k stay in cache). CUDA: a quarter of the free memory, so a paper-shape layer runs in one
    chunk (a handful of kernel launches). Under ``torch.compile``: one chunk, so the graph neither
    unrolls a loop nor depends on the batch size.
    """
    if torch.compiler.is_compiling():
        return n, batch
    if device.type == "cpu":
        queries = min(n, max(CONV_BATCH, AUTO_CHUNK_ELEMENTS // m))
        return queries, min(batch, max(1, AUTO_CHUNK_ELEMENTS // (queries * m)))
    # CUDA: a quarter of the free bytes, in float32 entries
    elements = torch.cuda.mem_get_info(device)[0] // 16 if device.type == "cuda" else DEVICE_CHUNK_ELEMENTS
    return max(1, min(n, elements // max(1, batch * m))), batch


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
    queries: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``num_neighbors`` most similar keys of every query, computed in query chunks.

    Args:
        q: queries ``[B, N, h]`` of all N tokens in order, or of the tokens ``queries``; or, when it
            is ``k`` itself (all tokens are candidates), the rows of all the keys' tokens, of which
            the tokens ``queries`` query: the rows are then prepared (normalised) once and the query
            rows taken from them.
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
        chunk_size: queries per chunk; None sizes it for the device (:func:`_auto_chunk`). Peak
            extra memory is O(B * chunk * M + B * N * k).
        queries: None (``q`` holds every token's query) or LongTensor ``[N]``: the token index of
            each query row, e.g. only the unpadded tokens of a padded map (N of them when ``q is k``).

    Returns:
        ``(values [B, N, k], indices [B, N, k])``: similarities and token indices (into the N
        tokens), best first (self first when ``self_first``).

    The selection itself runs without autograd and in float32 at least, also under autocast (ties
    of bf16 scores would change neighbours); the values come back in ``q``'s dtype. When ``q`` or
    ``k`` need gradients, the values of the selected pairs are recomputed from the gathered keys, so
    the backward costs O(N * k * h) instead of the dense O(N * M * h) of differentiating the
    similarity matrix. Nothing synchronises with the host.
    """
    batch, n, _ = q.shape
    m = k.shape[1]
    if queries is not None and k is q and candidates is None:  # the queries' rows are taken from k
        n = queries.numel()
    if queries is not None and queries.shape != (n,):
        raise ValueError(f"queries must be a LongTensor [{n}] (1 per query row), got {tuple(queries.shape)}")
    if candidates is None and queries is None and m != n:
        raise ValueError(f"without candidates the keys must cover all {n} tokens, got {m}")
    if candidates is not None and candidates.shape != (m,):
        raise ValueError(f"candidates must be a LongTensor [{m}] (1 per key), got {tuple(candidates.shape)}")
    if not 1 <= num_neighbors <= m:
        raise ValueError(f"k={num_neighbors} neighbours need 1 <= k <= number of candidates ({m})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    chunk, images = _auto_chunk(batch, n, m, q.device)
    chunk = chunk_size or chunk
    out_dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        ids = torch.arange(n, device=q.device) if queries is None else queries.to(q.device)
        values, indices = _knn_fp32(
            q, k, num_neighbors, kind, candidates, self_first, self_sim, (chunk, images), ids, chunk_size
        )
    return values.to(out_dtype), indices


def _knn_fp32(
    q: Tensor,
    k: Tensor,
    num_neighbors: int,
    kind: str,
    candidates: Tensor | None,
    self_first: bool,
    self_sim: Tensor | None,
    chunk: tuple[int, int],
    ids: Tensor,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`knn_select` on rows promoted to at least float32 (its arguments, checked; ``chunk`` =
    ``(queries, images)`` per chunk, ``chunk_size`` the caller's part of it, passed on to the compiled
    graph's selection op; ``ids [N]`` the token index of each query row; when ``k is q``
    holds more rows than ``ids``, the query rows are ``q[:, ids]`` after preparing)."""
    batch, n = q.shape[0], ids.shape[0]
    shared = k is q
    # contiguous first: a row norm over a transposed [B, N, h] view is ~20x slower on CPU
    q = _at_least_fp32(q).contiguous()
    k = q if shared else _at_least_fp32(k).contiguous()
    # raw: no gradient needs the prepared rows, so the selection prepares them itself (the keys
    # straight into their scoring layout; inductor's fused normalisation was 3x slower on CPU);
    # never in a jit trace, whose graph must not depend on the grad mode
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    raw = not needs_grad and not torch.jit.is_tracing()
    if not raw:
        q = prepare(q, kind)
        k = q if shared else prepare(k, kind)
        q = _query_rows(q, ids)
    picks = num_neighbors - 1 if self_first else num_neighbors
    if candidates is not None:
        candidates = candidates.to(q.device)
    with torch.no_grad():
        if torch.compiler.is_compiling():  # one opaque op runs the eager chunked selection
            values, positions, own = torch.ops.convnn.select(
                q, k, ids, picks, kind, candidates, self_first, raw, chunk_size
            )
            own = own if self_first and candidates is None else None
        else:
            values, positions, own = _select(q, k, ids, picks, kind, candidates, self_first, chunk, raw)
    self_ids = ids.expand(batch, n).unsqueeze(-1)
    if own is not None and self_sim is None:  # all candidates: the self value is a similarity entry too
        positions = torch.cat([self_ids, positions], dim=-1)
        values = torch.cat([own.unsqueeze(-1), values], dim=-1)
    if not raw:
        values = SelectedSimilarity.apply(q, k, positions, values, kind, chunk[0])
    indices = positions if candidates is None else candidates[positions]
    if not self_first or (own is not None and self_sim is None):
        return values, indices
    if self_sim is None:
        self_sim = self_similarity(q, kind)
    values = torch.cat([self_sim.unsqueeze(-1).to(values.dtype), values], dim=-1)
    return values, torch.cat([self_ids, indices], dim=-1)


def _query_rows(q: Tensor, ids: Tensor) -> Tensor:
    """The rows ``q[:, ids]`` when ``q [B, M, h]`` holds every token's row (``M != len(ids)``), else
    ``q``: one copy of the query rows from rows prepared once (``index_select``, ~3x faster on CPU
    than advanced indexing)."""
    return q if q.shape[1] == ids.shape[0] else q.index_select(1, ids)


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is a half type (bf16 / fp16), else unchanged."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _select(
    q: Tensor,
    k: Tensor,
    ids: Tensor,
    picks: int,
    kind: str,
    candidates: Tensor | None,
    self_first: bool,
    chunk: tuple[int, int],
    raw: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunked top-``picks`` of prepared rows (``raw``: of rows it prepares itself, see
    :func:`_prepared_rows`) -> ``(values, positions into k [B, N, picks], own)``.

    ``own`` is the similarity of each token with itself ``[B, N]`` (all candidates with
    ``self_first``), else None. With ``self_first`` the token's own candidate entry is masked out.
    ``chunk = (queries, images)``: peak extra memory is one ``[images, queries, M]`` chunk of scores.
    On CPU in float32 the scores of cosine / dot come from oneDNN (:func:`_onednn_keys`), one image
    and about ``chunk[0]`` queries per chunk (balanced, rounded up to a multiple of :data:`CONV_BATCH`;
    the last ``n % 16`` queries, if any, form a short tail chunk scored by the matmul).
    """
    queries, images = chunk
    if raw:
        q, k, keys = _prepared_rows(q, k, ids, kind, queries)
    else:
        keys = _onednn_keys(q, k, kind, queries)
    batch, n = q.shape[:2]
    starts = list(range(0, n, queries))
    if keys is not None:  # one image per chunk, balanced chunks of a multiple of 16 queries
        per_chunk = math.ceil(n / math.ceil(n / queries))
        per_chunk += -per_chunk % CONV_BATCH
        images, starts = 1, list(range(0, n - n % CONV_BATCH, per_chunk))
        starts += [n - n % CONV_BATCH] if n % CONV_BATCH and n >= CONV_BATCH else []  # a short tail
    if len(starts) == 1 and images >= batch:  # one chunk (always under torch.compile): no loop
        return _select_chunk(q, k, ids, picks, kind, candidates, self_first, keys)
    values = q.new_empty(batch, n, picks)
    positions = torch.empty(batch, n, picks, dtype=torch.long, device=q.device)
    own = q.new_empty(batch, n) if self_first and candidates is None else None
    bounds = list(zip(starts, [*starts[1:], n], strict=True))
    for first in range(0, batch, images):
        image_keys = None if keys is None else keys[first : first + images]
        for start, stop in bounds:
            part = (slice(first, first + images), slice(start, stop))
            top = _select_chunk(
                q[part], k[part[0]], ids[part[1]], picks, kind, candidates, self_first, image_keys
            )
            values[part], positions[part] = top[0], top[1]
            if own is not None:
                own[part] = top[2]
    return values, positions, own


@torch.library.custom_op(
    "convnn::select",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor ids, int picks, str kind, Tensor? candidates, bool self_first,"
    " bool raw, int? chunk_size) -> (Tensor, Tensor, Tensor)",
)
def _select_op(
    q: Tensor,
    k: Tensor,
    ids: Tensor,
    picks: int,
    kind: str,
    candidates: Tensor | None,
    self_first: bool,
    raw: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_select` as one op for ``torch.compile``, of :func:`prepare`-d rows (``raw``: it
    prepares them); chunks as in eager: ``chunk_size`` queries, or sized for the device when None;
    ``own`` is an empty tensor where :func:`_select` returns None."""
    if raw and q is not k and _same_rows(q, k):  # the compiled graph passes one tensor as two views
        k = q
    queries, images = _auto_chunk(q.shape[0], ids.shape[0], k.shape[1], q.device)
    chunk = (chunk_size or queries, images)
    values, positions, own = _select(q, k, ids, picks, kind, candidates, self_first, chunk, raw)
    return values, positions, q.new_empty(0) if own is None else own


@_select_op.register_fake
def _select_fake(q, k, ids, picks, kind, candidates, self_first, raw, chunk_size):
    batch, n = q.shape[0], ids.shape[0]
    own = q.new_empty(batch, n) if self_first and candidates is None else q.new_empty(0)
    return q.new_empty(batch, n, picks), q.new_empty(batch, n, picks, dtype=torch.long), own


def _select_chunk(
    q: Tensor,
    k: Tensor,
    ids: Tensor,
    picks: int,
    kind: str,
    candidates: Tensor | None,
    self_first: bool,
    keys: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`_select` for the query rows ``q [b, c, h]`` of tokens ``ids [c]`` against ``k [b, M, h]``
    (``keys``: :func:`_onednn_keys` of one image's ``k``, or None)."""
    if keys is None or q.shape[1] % CONV_BATCH:
        scores = prepared_similarity(q, k, kind)
    else:
        scores = _onednn_scores(q, keys, kind)[:, :, : k.shape[1]]
    lowest = torch.finfo(scores.dtype).min
    own = None
    if self_first and candidates is None:  # the token's own column: read, then masked out
        columns = ids.view(1, -1, 1).expand(scores.shape[0], -1, 1)
        own = scores.gather(2, columns).squeeze(2)
        scores.scatter_(2, columns, lowest)
    elif self_first:  # a token's own candidate entry, by comparison (no boolean indexing, no sync)
        scores.masked_fill_(ids[:, None] == candidates[None, :], lowest)
    values, positions = topk_last(scores, picks)
    return values, positions, own


_reference_products = False


@contextlib.contextmanager
def reference_products() -> Iterator[None]:
    """Within the block the similarity is the reference's plain matmul, never :func:`_onednn_scores`
    (which pads the keys to a multiple of 16): ``torch.profiler`` then counts the paper's FLOPs."""
    global _reference_products
    saved, _reference_products = _reference_products, True
    try:
        yield
    finally:
        _reference_products = saved


def _same_rows(q: Tensor, k: Tensor) -> bool:
    """Whether ``q`` and ``k`` view the same memory the same way."""
    return q.data_ptr() == k.data_ptr() and q.shape == k.shape and q.stride() == k.stride()


def _prepared_rows(q: Tensor, k: Tensor, ids: Tensor, kind: str, queries: int) -> tuple[Tensor, ...]:
    """:func:`prepare` of raw rows for :func:`_select` -> ``(query rows, keys, padded keys or None)``.

    The keys are normalised straight into :func:`_onednn_keys`' padded buffer when that applies
    (one pass and one buffer instead of two). The query rows are ``q[:, ids]`` when ``q`` has more
    rows than ``ids``; when ``k is q`` they are taken from the prepared keys (one normalisation).
    """
    shared, keys = k is q, None
    if kind == "cosine" and _onednn_applies(q, k, kind, queries):
        keys = _padded_keys(k)
        rows = keys[:, : k.shape[1]]
        k = torch.div(k, k.norm(2, -1, keepdim=True).clamp_min(NORMALIZE_EPS), out=rows)  # as F.normalize
    else:
        k = prepare(k, kind)
    q = _query_rows(k, ids) if shared else prepare(_query_rows(q, ids), kind)
    return q, k, _onednn_keys(q, k, kind, queries) if keys is None else keys


#: The norm clamp of :func:`prepare` (``F.normalize``'s default ``eps``).
NORMALIZE_EPS = 1e-12


def _onednn_applies(q: Tensor, k: Tensor, kind: str, queries: int) -> bool:
    """Whether :func:`_onednn_scores` scores these rows: CPU, float32, cosine or dot, chunks of >= 16
    queries, neither traced nor in :func:`reference_products` (profilers count the reference's matmul)."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == torch.float32
        and kind in ("cosine", "dot")
        and queries >= CONV_BATCH
        and not _reference_products
        and not torch.jit.is_tracing()
        and torch.backends.mkldnn.is_available()
    )


def _onednn_keys(q: Tensor, k: Tensor, kind: str, queries: int) -> Tensor | None:
    """Keys ``k [B, M, h]`` zero-padded to a multiple of :data:`CONV_BATCH` rows when
    :func:`_onednn_scores` applies (:func:`_onednn_applies`), else None."""
    if not _onednn_applies(q, k, kind, queries):
        return None
    if not k.shape[1] % CONV_BATCH:
        return k.contiguous()
    keys = _padded_keys(k)
    keys[:, : k.shape[1]] = k
    return keys


def _padded_keys(k: Tensor) -> Tensor:
    """An uninitialised ``[B, M', h]`` buffer for ``k [B, M, h]``, M' the next multiple of
    :data:`CONV_BATCH`, with the padding rows zeroed (only them: ``F.pad`` fills it all)."""
    batch, m, h = k.shape
    keys = k.new_empty(batch, m + -m % CONV_BATCH, h)
    keys[:, m:].zero_()
    return keys


def _onednn_scores(q: Tensor, keys: Tensor, kind: str) -> Tensor:
    """``q [1, c, h] @ keys [1, M', h]^T -> [1, c, M']`` (``/ sqrt(h)`` for dot) as oneDNN's 1x1
    convolution of the query rows with the keys as its weight: on CPU about 2.4x the throughput of the
    BLAS matmul on these narrow shapes (``c`` and ``M'`` multiples of :data:`CONV_BATCH`)."""
    scores = _rows_conv(q[0], keys[0], None).unsqueeze(0)
    return scores.div_(math.sqrt(q.shape[-1])) if kind == "dot" else scores


class SelectedSimilarity(torch.autograd.Function):
    """The similarities of selected pairs, differentiable without storing any similarity matrix.

    Forward returns ``values [B, N, p]`` (already computed by the selection, without autograd) for the
    pairs ``(i, positions[b, i, j])`` of prepared rows ``q [B, N, h]``, ``k [B, M, h]``; nothing is
    stored beyond ``q``, ``k`` and the positions. Backward on CPU: the selected pairs only
    (:func:`_selected_pairs_grad`, O(N * p * h), compiled or not). Elsewhere it rebuilds the gradient in the
    selection's query chunks (``chunk``) as a ``[B, chunk, M]`` matrix that is zero outside the
    selected pairs and applies it with two batched matmuls, O(N * M * h) but two large GEMMs (a GPU's
    strength) with no atomics: a row's positions are distinct, so a plain ``scatter_`` fills the
    matrix, deterministic on every device.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, positions: Tensor, values: Tensor, kind: str, chunk: int) -> Tensor:
        return values.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, positions, _, kind, chunk = inputs
        ctx.save_for_backward(q, k, positions)
        ctx.kind, ctx.chunk = kind, chunk

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, positions = ctx.saved_tensors
        h = k.shape[-1]
        grad = grad.to(q.dtype) / math.sqrt(h) if ctx.kind == "dot" else grad.to(q.dtype)
        if q.device.type == "cpu":  # a custom op, so compiled graphs run the same steps
            grad_q, grad_k = _selected_pairs_grad(q, k, positions, grad.contiguous(), ctx.kind)
        else:
            grad_q, grad_k = _dense_pairs_grad(q, k, positions, grad, ctx.kind, ctx.chunk)
        return grad_q, grad_k, None, None, None, None


def _dense_pairs_grad(
    q: Tensor, k: Tensor, positions: Tensor, grad: Tensor, kind: str, chunk: int
) -> tuple[Tensor, Tensor]:
    """:func:`_selected_pairs_grad` through a dense ``[B, chunk, M]`` gradient matrix per query chunk,
    zero outside the selected pairs, applied by two batched matmuls."""
    batch, n, _ = positions.shape
    m = k.shape[1]
    grad_q, grad_k = torch.empty_like(q), torch.zeros_like(k)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        g = q.new_zeros(batch, stop - start, m).scatter_(2, positions[:, start:stop], grad[:, start:stop])
        q_rows = q[:, start:stop]
        grad_q[:, start:stop] = g @ k
        grad_k += g.transpose(1, 2) @ q_rows
        if kind == "euclidean":  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
            grad_q[:, start:stop] = 2 * grad_q[:, start:stop] - 2 * q_rows * g.sum(-1, keepdim=True)
            grad_k -= k * g.sum(1).unsqueeze(-1)
    if kind == "euclidean":
        grad_k *= 2
    return grad_q, grad_k


@torch.library.custom_op(
    "convnn::selected_pairs_grad",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor positions, Tensor grad, str kind) -> (Tensor, Tensor)",
)
def _selected_pairs_grad(
    q: Tensor, k: Tensor, positions: Tensor, grad: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """Gradients of the similarities of the pairs ``(i, positions[b, i, j])`` for ``grad [B, N, p]``
    (already divided by ``sqrt(h)`` for dot) -> ``(q' [B, N, h], k' [B, M, h])``, in query steps of
    about :data:`STEP_ELEMENTS` gathered values: ``q'_i = sum_j g_ij k_j`` from the step's gathered
    key rows, ``k'`` by adding the rows ``g_ij q_i`` in order (:func:`~convnn.native.index_add_rows`:
    deterministic). Euclidean adds ``-2 q_i sum_j g_ij`` and ``-2 k_j sum_i g_ij`` and doubles."""
    batch, n, p = positions.shape
    m, h = k.shape[1:]
    flat = flat_indices(positions, m)  # rows of k [B * M, h]
    key_rows, grad_k = k.reshape(batch * m, h), k.new_zeros(batch * m, h)
    grad_q = torch.empty_like(q)
    size = max(1, STEP_ELEMENTS // max(1, batch * p * h))
    for start in range(0, n, size):
        stop = min(start + size, n)
        step, g = flat[:, start:stop].reshape(-1), grad[:, start:stop].unsqueeze(-1)  # g [B, c, p, 1]
        rows = key_rows.index_select(0, step).view(batch, stop - start, p, h)
        grad_q[:, start:stop] = rows.mul_(g).sum(2)
        pair_rows = torch.mul(q[:, start:stop].unsqueeze(2), g, out=rows)  # g_ij q_i, in the same buffer
        index_add_rows(grad_k, step, pair_rows.view(-1, h))
    grad_k = grad_k.view_as(k)
    if kind == "euclidean":  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
        per_key = k.new_zeros(batch * m).index_add_(0, flat.reshape(-1), grad.reshape(-1)).view(batch, m, 1)
        grad_q = 2 * (grad_q - q * grad.sum(-1, keepdim=True))
        grad_k = 2 * (grad_k - k * per_key)
    return grad_q, grad_k


@_selected_pairs_grad.register_fake
def _selected_pairs_grad_fake(q, k, positions, grad, kind):
    return torch.empty_like(q), torch.empty_like(k)


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

    ``out[b, :, i * k + j] = v[b, :, indices[b, i, j]]``: whole token rows are picked with
    :func:`token_rows` and returned as a channel-first view, so the backward is an ``index_add_``
    (deterministic on CUDA under ``torch.use_deterministic_algorithms``), never a scatter.
    """
    batch, channels, _ = v.shape
    rows = token_rows(v.transpose(1, 2), indices)  # [B, N' * k, C]
    return rows.view(batch, -1, channels).transpose(1, 2)


def flat_indices(indices: Tensor, n: int) -> Tensor:
    """Token indices ``[B, N', k]`` of each image's ``n`` rows as indices into the ``B * n`` rows of
    all images (``indices[b] + b * n``), same shape."""
    batch = indices.shape[0]
    return indices + torch.arange(batch, device=indices.device).view(batch, 1, 1) * n


def token_rows(tokens: Tensor, indices: Tensor) -> Tensor:
    """The rows ``tokens [B, N, C]`` at ``indices [B, N', k]`` -> ``[B, N', k, C]`` (one ``index_select``)."""
    batch, n, channels = tokens.shape
    picked = tokens.reshape(batch * n, channels).index_select(0, flat_indices(indices, n).reshape(-1))
    return picked.view(*indices.shape, channels)


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
    and stride k, but folds the batch into the length (the ``[1, C * k, B * N']`` layout, ``conv``'s
    own weight as the equivalent 1x1 convolution). On CPU in training, with a dense ``conv``,
    :func:`gather_aggregate` computes the same (ρ included) in cache-sized token steps without keeping
    the gathered rows. Parameters and the Conv1d op (and so every FLOP counter) are unchanged.
    """
    check_choice("rho", rho, RHOS)
    batch, channels, _ = v.shape
    k = indices.shape[-1]
    if conv.kernel_size != (k,) or conv.stride != (k,):
        got = (conv.kernel_size[0], conv.stride[0])
        raise ValueError(f"conv needs kernel_size = stride = k = {k}, got {got}")
    tokens, m = indices.shape[1], v.shape[2]
    v_rows = v.transpose(1, 2).reshape(-1, channels)  # [B * N, C]: token b * N + i is token i of image b
    flat = flat_indices(indices, m).reshape(-1, k)
    scale = values.softmax(dim=-1).to(v.dtype).reshape(-1, k) if rho == "softmax" else None  # [B * N', k]
    if conv.groups == 1 and steps_apply(v_rows, conv.weight):  # compiled: a custom op
        weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, k * channels)
        out = gather_aggregate(v_rows, flat, weight, conv.bias, scale)  # [B * N', C']
        return out.view(batch, tokens, -1).transpose(1, 2)
    rows = v_rows.index_select(0, flat.reshape(-1)).view(-1, k, channels)  # [B * N', k, C]
    if scale is not None:
        rows = rows * scale.unsqueeze(-1)
    if torch.compiler.is_compiling():  # inductor's conv backward would specialise the batch size
        out = grouped_matmul(rows, conv.weight, conv.groups)
        out = out if conv.bias is None else out + conv.bias
        return out.view(batch, tokens, -1).transpose(1, 2)
    rows = rows.permute(2, 1, 0).reshape(1, channels * k, -1)  # row c * k + j, as ``conv`` reads them
    out = F.conv1d(rows, conv.weight.reshape(conv.out_channels, -1, 1), conv.bias, groups=conv.groups)
    return out.view(-1, batch, tokens).transpose(0, 1).contiguous()


def grouped_matmul(rows: Tensor, weight: Tensor, groups: int) -> Tensor:
    """A Conv1d (kernel = stride = k, ``groups``) as one einsum, no bias: ``rows [T, k, C]``,
    ``weight [C', C / groups, k]`` -> ``[T, C']``."""
    tokens, k, channels = rows.shape
    out_channels = weight.shape[0]
    if groups == 1:  # one GEMM (compilers keep it a library call)
        return rows.reshape(tokens, k * channels) @ weight.permute(0, 2, 1).reshape(out_channels, -1).t()
    w = weight.view(groups, out_channels // groups, channels // groups, k)
    out = torch.einsum("tjgi,goij->tgo", rows.view(tokens, k, groups, channels // groups), w)
    return out.reshape(tokens, out_channels)


def steps_apply(x: Tensor, weight: Tensor) -> bool:
    """Whether a step-wise CPU kernel (:func:`gather_aggregate`, :func:`gather_scaled_sum`) may stand
    in for the plain gather and aggregation ops on ``x`` with ``weight``: on CPU (the steps pay only
    there), when gradients are needed, in matching dtypes, outside autocast and tracing (a traced
    graph keeps the plain ops, whose FLOPs the profiler counts)."""
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.dtype == weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.jit.is_tracing()
    )


#: Gathered elements per step of :func:`gather_aggregate` / :func:`gather_scaled_sum` (4 MiB of float32:
#: the step stays in cache).
STEP_ELEMENTS = 1 << 20


@torch.library.custom_op(
    "convnn::gather_aggregate",
    mutates_args=(),
    schema="(Tensor v_rows, Tensor flat, Tensor weight, Tensor? bias, Tensor? scale) -> Tensor",
)
def gather_aggregate(
    v_rows: Tensor, flat: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor | None
) -> Tensor:
    """``out[t] = bias + concat_j(scale[t, j] * v_rows[flat[t, j]]) @ weight`` without the full
    gathered rows.

    ``v_rows [L, C]`` (token-major), ``flat [T, k]`` (token indices), ``weight [C', k * C]`` (column
    ``j * C + c`` is ``conv.weight[:, c, j]``), ``scale [T, k]`` (ρ's weights; None: ones) ->
    ``[T, C']``. Runs over the T tokens in steps of about
    :data:`STEP_ELEMENTS` gathered values: each step gathers whole token rows with ``index_select``
    (contiguous copies) and applies the weight as a 1x1 convolution over a channels-last view of the
    rows (:func:`_rows_conv`: oneDNN's kernels, about twice the throughput of a plain GEMM on these
    narrow shapes). Only ``v_rows`` and ``flat`` are saved; the backward walks the same steps,
    re-gathers a step's rows for the weight gradient and adds the rows' gradient into ``v_rows``'
    gradient with :func:`~convnn.native.index_add_rows` (in order: deterministic). A custom op, so
    ``torch.compile`` calls these same steps.
    """
    out = v_rows.new_empty(flat.shape[0], weight.shape[0])
    for start, step, rows in _gathered_steps(v_rows, flat):
        if scale is not None:  # the step's own buffer, scaled in place
            rows.mul_(scale[start : start + step.shape[0]].unsqueeze(-1))
        out[start : start + step.shape[0]] = _rows_conv(rows.flatten(1), weight, bias)
    return out


@gather_aggregate.register_fake
def _gather_aggregate_fake(v_rows, flat, weight, bias, scale):
    return v_rows.new_empty(flat.shape[0], weight.shape[0])


@torch.library.custom_op(
    "convnn::gather_aggregate_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor v_rows, Tensor flat, Tensor weight, Tensor? scale, bool rows_grad,"
    " bool weight_grad, bool scale_grad) -> (Tensor, Tensor, Tensor)",
)
def _gather_aggregate_backward(
    grad: Tensor,
    v_rows: Tensor,
    flat: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    rows_grad: bool,
    weight_grad: bool,
    scale_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gather_aggregate` for ``grad [T, C']``: ``(v_rows', weight', scale')``, each
    an empty tensor where not asked for (``scale'`` also when ``scale`` is None)."""
    scale_grad = scale_grad and scale is not None
    grad_v, grad_w = _like_or_empty((v_rows, rows_grad), (weight, weight_grad), zeros=True)
    grad_s = v_rows.new_empty(flat.shape if scale_grad else (0,))
    scaled = None  # the scaled rows of a step, beside the gathered ones (sized by the first, largest step)
    for start, step, rows in _gathered_steps(v_rows, flat):
        stop = start + step.shape[0]
        step_grad, conv_rows = grad[start:stop], rows
        if scale is not None:  # the conv saw the scaled rows; the rows stay for the scale's gradient
            scaled = torch.empty_like(rows) if scaled is None else scaled
            conv_rows = torch.mul(rows, scale[start:stop].unsqueeze(-1), out=scaled[: step.shape[0]])
        grad_rows, step_grad_w = _rows_conv_backward(conv_rows.flatten(1), weight, step_grad, weight_grad)
        if weight_grad:
            grad_w += step_grad_w
        grad_rows = grad_rows.view(rows.shape)
        if scale_grad:
            torch.sum(torch.mul(grad_rows, rows, out=conv_rows), -1, out=grad_s[start:stop])
        if rows_grad:
            if scale is not None:
                grad_rows.mul_(scale[start:stop].unsqueeze(-1))
            index_add_rows(grad_v, step.reshape(-1), grad_rows.view(-1, v_rows.shape[1]))
    return grad_v, grad_w, grad_s


@_gather_aggregate_backward.register_fake
def _gather_aggregate_backward_fake(grad, v_rows, flat, weight, scale, rows_grad, weight_grad, scale_grad):
    grad_s = v_rows.new_empty(flat.shape if scale_grad and scale is not None else (0,))
    return (*_like_or_empty((v_rows, rows_grad), (weight, weight_grad)), grad_s)


def _gather_aggregate_setup(ctx, inputs: tuple, output: Tensor) -> None:
    v_rows, flat, weight, _, scale = inputs
    ctx.save_for_backward(v_rows, flat, weight, scale)


def _gather_aggregate_grad(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    v_rows, flat, weight, scale = ctx.saved_tensors
    rows_grad, _, weight_grad, bias_grad, scale_grad = ctx.needs_input_grad
    grad = grad.contiguous()
    grad_v, grad_w, grad_s = _gather_aggregate_backward(
        grad, v_rows, flat, weight, scale, rows_grad, weight_grad, scale_grad
    )
    return (
        grad_v if rows_grad else None,
        None,
        grad_w if weight_grad else None,
        grad.sum(0) if bias_grad else None,
        grad_s if scale_grad else None,
    )


gather_aggregate.register_autograd(_gather_aggregate_grad, setup_context=_gather_aggregate_setup)


@torch.library.custom_op(
    "convnn::gather_scaled_sum",
    mutates_args=(),
    schema="(Tensor v_rows, Tensor flat, Tensor w, Tensor scale) -> Tensor",
)
def gather_scaled_sum(v_rows: Tensor, flat: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """``out[t] = sum_j w[t, j] * scale[j] * v_rows[flat[t, j]]`` (a depthwise aggregation of the
    gathered neighbours, weighted by rho) without the gathered ``[T, k, d]`` rows.

    ``v_rows [L, d]``, ``flat [T, k]`` (row indices), ``w [T, k]``, ``scale [k, d]`` -> ``[T, d]``.
    Runs in steps of about :data:`STEP_ELEMENTS` gathered values into a reused buffer, forward and
    backward (which re-gathers a step's rows), so no tensor of the full gathered size is made: on CPU
    a fresh multi-MiB tensor costs as much again in page faults as the arithmetic on it. The rows'
    gradient is added with :func:`~convnn.native.index_add_rows` (in order: deterministic). A custom
    op, so ``torch.compile`` calls these same steps.
    """
    out = v_rows.new_empty(flat.shape[0], v_rows.shape[1])
    for start, step, rows in _gathered_steps(v_rows, flat):
        stop = start + step.shape[0]
        torch.bmm(w[start:stop].unsqueeze(1), rows.mul_(scale), out=out[start:stop].unsqueeze(1))
    return out


@gather_scaled_sum.register_fake
def _gather_scaled_sum_fake(v_rows: Tensor, flat: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    return v_rows.new_empty(flat.shape[0], v_rows.shape[1])


@torch.library.custom_op(
    "convnn::gather_scaled_sum_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor v_rows, Tensor flat, Tensor w, Tensor scale, bool rows_grad, bool w_grad,"
    " bool scale_grad) -> (Tensor, Tensor, Tensor)",
)
def _gather_scaled_sum_backward(
    grad: Tensor,
    v_rows: Tensor,
    flat: Tensor,
    w: Tensor,
    scale: Tensor,
    rows_grad: bool,
    w_grad: bool,
    scale_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gather_scaled_sum` for ``grad [T, d]``: ``(v_rows', w', scale')``, each an
    empty tensor where not asked for."""
    wanted = (v_rows, rows_grad), (w, w_grad), (scale, scale_grad)
    grad_v, grad_w, grad_scale = _like_or_empty(*wanted, zeros=True)
    for start, step, rows in _gathered_steps(v_rows, flat):
        stop = start + step.shape[0]
        step_grad, step_w = grad[start:stop], w[start:stop]
        product = rows.mul_(step_grad.unsqueeze(1))  # g[t] * rows[t, j], in the gather buffer
        if scale_grad:  # sum_t w[t, j] g[t] * rows[t, j]: k products [1, S] @ [S, d]
            grad_scale += torch.bmm(step_w.t().unsqueeze(1), product.transpose(0, 1)).squeeze(1)
        if w_grad:  # scale[j] . (g[t] * rows[t, j])
            grad_w[start:stop] = (product * scale).sum(2)
        if rows_grad:  # w[t, j] * scale[j] * g[t] into row flat[t, j]
            scaled = step_w.unsqueeze(2) * scale * step_grad.unsqueeze(1)
            index_add_rows(grad_v, step.reshape(-1), scaled.reshape(-1, scaled.shape[-1]))
    return grad_v, grad_w, grad_scale


@_gather_scaled_sum_backward.register_fake
def _gather_scaled_sum_backward_fake(grad, v_rows, flat, w, scale, rows_grad, w_grad, scale_grad):
    return _like_or_empty((v_rows, rows_grad), (w, w_grad), (scale, scale_grad))


def _gather_scaled_sum_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _gather_scaled_sum_grad(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
    v_rows, flat, w, scale = ctx.saved_tensors
    rows_grad, _, w_grad, scale_grad = ctx.needs_input_grad
    grads = _gather_scaled_sum_backward(
        grad.contiguous(), v_rows, flat, w, scale, rows_grad, w_grad, scale_grad
    )
    grad_v, grad_w, grad_scale = grads
    return grad_v if rows_grad else None, None, grad_w if w_grad else None, grad_scale if scale_grad else None


gather_scaled_sum.register_autograd(_gather_scaled_sum_grad, setup_context=_gather_scaled_sum_setup)


def _gathered_steps(v_rows: Tensor, flat: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(start, step, rows)`` per step of :func:`_step` tokens: the step's indices ``flat[start:
    start + S]`` and their rows ``v_rows[step]`` as ``[S, k, C]``, gathered into one buffer reused by
    every step (a fresh multi-MiB tensor per step costs as much again in page faults as the copy
    itself), so a step's rows are valid until the next step."""
    tokens, k = flat.shape
    size = _step(flat, v_rows)
    buffer = v_rows.new_empty(min(size, tokens) * k, v_rows.shape[1])
    for start in range(0, tokens, size):
        step = flat[start : start + size]
        rows = torch.index_select(v_rows, 0, step.reshape(-1), out=buffer[: step.numel()])
        yield start, step, rows.view(step.shape[0], k, -1)


def _like_or_empty(*pairs: tuple[Tensor, bool], zeros: bool = False) -> tuple[Tensor, ...]:
    """``empty_like(x)`` (``zeros``: ``zeros_like(x)``) for each ``(x, wanted)`` that is wanted, else an
    empty tensor: a custom op's "no gradient" (ops return tensors, not None)."""
    like = torch.zeros_like if zeros else torch.empty_like
    return tuple(like(x) if wanted else x.new_empty(0) for x, wanted in pairs)


def _step(flat: Tensor, v_rows: Tensor) -> int:
    """Tokens per step of :func:`gather_aggregate` / :func:`gather_scaled_sum`: about
    :data:`STEP_ELEMENTS` gathered values, a multiple of :data:`CONV_BATCH`."""
    tokens = STEP_ELEMENTS // (flat.shape[1] * v_rows.shape[1])
    return max(CONV_BATCH, tokens - tokens % CONV_BATCH)


#: Rows of a step are viewed as this many images for the 1x1 convolution (oneDNN runs a 1x1 conv
#: with one thread only from a batch of 16; smaller batches fall back to a slow GEMM path).
CONV_BATCH = 16


def _conv_view(rows: Tensor) -> Tensor:
    """``[S, F]`` rows as the channels-last ``[16, F, S / 16, 1]`` images they already are in memory."""
    return rows.view(CONV_BATCH, rows.shape[0] // CONV_BATCH, 1, rows.shape[1]).permute(0, 3, 1, 2)


def _rows_conv(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows [S, F] @ weight[C', F]^T + bias -> [S, C']`` (a 1x1 conv when S is a multiple of 16)."""
    if rows.shape[0] % CONV_BATCH:
        return F.linear(rows, weight, bias)
    out = F.conv2d(_conv_view(rows), weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)


def _rows_conv_backward(
    rows: Tensor, weight: Tensor, grad: Tensor, weight_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`_rows_conv` for ``grad [S, C']``: ``(rows [S, F], weight [C', F] or None)``."""
    if rows.shape[0] % CONV_BATCH:
        return grad @ weight, grad.t() @ rows if weight_grad else None
    grad_rows, grad_w, _ = torch.ops.aten.convolution_backward(
        _conv_view(grad),
        _conv_view(rows),
        weight[:, :, None, None],
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
        [True, weight_grad, False],
    )
    grad_rows = grad_rows.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    return grad_rows, None if grad_w is None else grad_w.view(weight.shape)


class CandidateSampler(nn.Module):
    """Which tokens are candidate neighbours: "all", "random" (``num_candidates`` r) or "spatial".

    ``num_candidates`` is required for "random" / "spatial" and ignored by "all" (so a sweep over
    ``sampling`` can keep one r). A map's spatial grid is ``floor(sqrt(r)) x floor(sqrt(r))``, so the
    paper's Figure 5 "r" (r^2 random candidates or an r x r grid) is ``num_candidates = r^2``.

    ``fallback_to_all``: when r exceeds the tokens (random) or the grid's side exceeds the real map's
    (spatial), use all candidates (each token its own first neighbour) instead of raising, as the
    paper's Figure 5 runs did on VGG-11's small late-stage maps. Off by default: never silent.

    Candidates are made on the input's device without a host round trip: random ones drawn there, in
    training mode from the global RNG (reproducible through ``seed_everything``), in eval mode from
    this module's own generator for that device (:meth:`generator_for`), which :func:`reset_sampling`
    re-seeds at the start of every validation / test epoch; spatial ones built once per map shape and
    device and cached.
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
        self.seed = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._spatial: dict[tuple, Tensor] = {}

    def reseed(self, seed: int) -> None:
        """Restart the evaluation draws from ``seed`` on every device."""
        self.seed = seed
        self._generators.clear()

    def generator_for(self, device: torch.device) -> torch.Generator:
        """This sampler's evaluation generator on ``device``, seeded with :attr:`seed` when first used."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

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
        device = torch.device(device or "cpu")
        if self.sampling == "random":
            generator = None if self.training else self.generator_for(device)
            return random_candidates(n, self.num_candidates, generator, device)
        key = (n, grid, padding, device)
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            return spatial_candidates(n, self.num_candidates, grid, padding).to(device)
        if key not in self._spatial:
            self._spatial[key] = spatial_candidates(n, self.num_candidates, grid, padding).to(device)
        return self._spatial[key]

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
        sampler.reseed((seed * 100003 + index) % (1 << 63))
    return len(samplers)

"""Top-k neighbour selection (stage 3 of the k-NN core): :func:`knn_select` in query chunks sized per
device, without autograd and in float32 at least; on CPU the scores come from oneDNN and the top-k
from the native kernel (:mod:`convnn.knn.native`); under ``torch.compile`` the chunked selection is
one opaque op (``convnn::select``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from convnn.knn import native
from convnn.knn.native import MAX_K, topk_last
from convnn.knn.ops import CONV_BATCH, ONEDNN_PRODUCTS, SelectedSimilarity, _rows_conv
from convnn.knn.precision import full_fp32
from convnn.knn.similarity import NORMALIZE_EPS, prepare, prepared_similarity, self_similarity

#: Similarity entries per chunk on CPU when ``chunk_size`` is None (2 MiB of float32: the chunk of
#: scores stays in the core's cache for the top-k that reads it again).
AUTO_CHUNK_ELEMENTS = 1 << 19


#: Similarity elements per chunk on devices other than the CPU, when free memory is unknown.
DEVICE_CHUNK_ELEMENTS = 1 << 28


def _auto_chunk(batch: int, n: int, m: int, device: torch.device) -> tuple[int, int]:
    """``(queries, images)`` per chunk of a ``[images, queries, m]`` similarity, sized for ``device``.

    CPU: about :data:`AUTO_CHUNK_ELEMENTS` entries, queries of one image first (the chunk and its
    top-k stay in cache). Other devices: :func:`_device_chunk`. Under ``torch.compile``: one chunk, so
    the graph neither unrolls a loop nor depends on the batch size.
    """
    if torch.compiler.is_compiling():
        return n, batch
    if device.type == "cpu":
        queries = min(n, max(CONV_BATCH, AUTO_CHUNK_ELEMENTS // m))
        return queries, min(batch, max(1, AUTO_CHUNK_ELEMENTS // (queries * m)))
    return _device_chunk(batch, n, m, device)


@functools.cache
def _device_chunk(batch: int, n: int, m: int, device: torch.device) -> tuple[int, int]:
    """:func:`_auto_chunk` off the CPU, sized once per shape and device (cached): CUDA takes a quarter
    of the memory free for tensors, so a paper-shape layer runs in one chunk (a handful of kernel
    launches); other devices :data:`DEVICE_CHUNK_ELEMENTS` entries. Asking the driver on every call
    would shrink the chunks as PyTorch's allocator caches freed blocks (``cudaMemGetInfo`` counts
    them as used) and cost a driver call per layer and step."""
    elements = _cuda_free_bytes(device) // 16 if device.type == "cuda" else DEVICE_CHUNK_ELEMENTS
    return max(1, min(n, elements // max(1, batch * m))), batch


def _cuda_free_bytes(device: torch.device) -> int:
    """Bytes tensors can still take on ``device``: the driver's free memory plus the blocks PyTorch's
    allocator holds unused."""
    free = torch.cuda.mem_get_info(device)[0]
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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


@full_fp32()
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
    the last ``n % 16`` queries, if any, form a short tail chunk scored by the matmul); the native
    ``select_chunks`` runs these chunks on all threads at once (:mod:`convnn.knn.native`). Products in
    IEEE float32 whatever the process-wide precision (:func:`~convnn.knn.precision.full_fp32`).
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
        if picks <= MAX_K and native.serves(q):  # the chunks on all threads at once
            dot, m = kind == "dot", k.shape[1]
            values, positions, own = torch.ops.convnn_native.select_chunks(
                q, keys, m, ids, picks, dot, candidates, self_first, starts, ONEDNN_PRODUCTS
            )
            return values, positions, own if self_first and candidates is None else None
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
    """``q [1, c, h] @ keys [1, M', h]^T -> [1, c, M']`` (``/ sqrt(h)`` for dot; ``c`` and ``M'``
    multiples of :data:`CONV_BATCH`): where :data:`~convnn.knn.ops.ONEDNN_PRODUCTS` (AVX-512) as
    oneDNN's 1x1 convolution of the query rows with the keys as its weight (there about 2.4x the
    throughput of the BLAS matmul on these narrow shapes), else as the BLAS GEMM."""
    scores = _rows_conv(q[0], keys[0], None) if ONEDNN_PRODUCTS else torch.mm(q[0], keys[0].t())
    return scores.unsqueeze(0).div_(math.sqrt(q.shape[-1])) if kind == "dot" else scores.unsqueeze(0)


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

"""The k-NN core shared by every ConvNN layer: similarity, candidate sets, chunked top-k, gather, rho.

One module per stage: :mod:`~convnn.knn.similarity`, :mod:`~convnn.knn.candidates`,
:mod:`~convnn.knn.selection`, :mod:`~convnn.knn.aggregation`; the custom ops and their backward
passes in :mod:`~convnn.knn.ops`, the CPU kernels in :mod:`~convnn.knn.native` (``csrc/``), and a
literal transcription of the paper's Algorithm 1 in :mod:`~convnn.knn.reference`.

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
  memory allows, sized once per shape; under ``torch.compile`` the chunked selection is one opaque
  op), so peak extra memory is O(B * chunk * M + B * N * k) instead of the dense ``[B, N, N]``
  matrix; the selection runs in IEEE float32 also under autocast and whatever the process-wide
  matmul precision (TF32 / bf16 would move near-tied neighbours); on CPU the scores come from
  oneDNN and the top-k from the native kernel (:mod:`convnn.knn.native`);
* neighbour rows are gathered whole from the token-major ``[B * N, C]`` rows (:func:`gather_rows`;
  backward: an index-add in a fixed order, deterministic on every device without
  ``torch.use_deterministic_algorithms``; on CPU the native :func:`~convnn.knn.native.index_add_rows`),
  never from an expanded ``[B, C, N, k]`` copy; in training on CPU (``rho="ones"``) not even the
  gathered rows exist at once: :func:`gather_aggregate` (and :func:`gather_scaled_sum` for the
  depthwise, rho-weighted sum of ConvNN-attention) works in cache-sized token steps;
* selection runs without autograd; gradients of the selected similarities (rho softmax) flow through
  the selected pairs only (:class:`SelectedSimilarity`);
* ``rho="ones"`` does no multiplication at all, and masks use the dtype's finite minimum, so nothing
  overflows in bf16 / fp16;
* nothing synchronises with the host: random candidates are drawn on the input's device (training:
  the global RNG, seeded by Lightning's ``seed_everything``; evaluation: :class:`CandidateSampler`'s
  generator for that device, re-seeded by :func:`reset_sampling`, so test metrics with random
  sampling are reproducible), spatial ones are built there and cached per shape and device, masks use
  ``masked_fill`` / ``scatter_``, never boolean indexing.
"""

from convnn.knn.aggregation import (
    aggregate_neighbors,
    gather_neighbors,
    gather_rows,
    grouped_matmul,
    modulate,
    steps_apply,
    token_rows,
)
from convnn.knn.candidates import (
    SAMPLINGS,
    CandidateSampler,
    fits,
    random_candidates,
    reset_sampling,
    spatial_candidates,
)
from convnn.knn.ops import flat_indices, gather_aggregate, gather_scaled_sum
from convnn.knn.selection import knn_select, nearest_by_place, reference_products
from convnn.knn.similarity import (
    RHOS,
    SIMILARITIES,
    check_choice,
    pair_similarity,
    prepare,
    prepared_similarity,
    self_similarity,
    similarity,
)

__all__ = [
    "RHOS",
    "SAMPLINGS",
    "SIMILARITIES",
    "CandidateSampler",
    "aggregate_neighbors",
    "check_choice",
    "fits",
    "flat_indices",
    "gather_aggregate",
    "gather_neighbors",
    "gather_rows",
    "gather_scaled_sum",
    "grouped_matmul",
    "knn_select",
    "modulate",
    "nearest_by_place",
    "pair_similarity",
    "prepare",
    "prepared_similarity",
    "random_candidates",
    "reference_products",
    "reset_sampling",
    "self_similarity",
    "similarity",
    "spatial_candidates",
    "steps_apply",
    "token_rows",
]

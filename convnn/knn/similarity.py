"""Similarity of query and key rows (stage 1 of the k-NN core): cosine, dot, euclidean.

Rows are token sequences ``[B, N, h]``; larger is always more similar.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ("cosine", "dot", "euclidean")
RHOS = ("ones", "softmax")


#: The norm clamp of :func:`prepare` (``F.normalize``'s default ``eps``).
NORMALIZE_EPS = 1e-12


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

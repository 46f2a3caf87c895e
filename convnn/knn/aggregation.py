"""Neighbour gathering, modulation by rho and aggregation (stage 4 of the k-NN core).

Neighbour rows are gathered whole from the token-major ``[B * N, C]`` rows (:func:`gather_rows`;
backward: an index-add in a fixed order, never a scatter), never from an expanded ``[B, C, N, k]``
copy; on CPU in training :func:`~convnn.knn.ops.gather_aggregate` works in cache-sized token steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.knn.ops import flat_indices, gather_aggregate
from convnn.knn.similarity import RHOS, check_choice


def gather_neighbors(v: Tensor, indices: Tensor) -> Tensor:
    """Neighbour rows in Conv1d layout: ``v [B, C, N]``, ``indices [B, N', k] -> [B, C, N' * k]``.

    ``out[b, :, i * k + j] = v[b, :, indices[b, i, j]]``: whole token rows are picked with
    :func:`token_rows` and returned as a channel-first view, so the backward is an index-add
    (deterministic on every device, see :func:`gather_rows`), never a scatter.
    """
    batch, channels, _ = v.shape
    rows = token_rows(v.transpose(1, 2), indices)  # [B, N' * k, C]
    return rows.view(batch, -1, channels).transpose(1, 2)


def token_rows(tokens: Tensor, indices: Tensor) -> Tensor:
    """The rows ``tokens [B, N, C]`` at ``indices [B, N', k]`` -> ``[B, N', k, C]`` (:func:`gather_rows`)."""
    batch, n, channels = tokens.shape
    picked = gather_rows(tokens.reshape(batch * n, channels), flat_indices(indices, n).reshape(-1))
    return picked.view(*indices.shape, channels)


def gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """The rows ``rows [L, C]`` at ``index [R]`` -> ``[R, C]``, with a deterministic backward.

    On CUDA, when the rows need a gradient, by advanced indexing: its backward
    (``index_put_(accumulate=True)``) sorts the indices and adds each row's gradients in that order,
    without ``torch.use_deterministic_algorithms`` and without a host sync, where ``index_select``'s
    backward (``index_add_``) adds them with atomics in whatever order the threads run. Elsewhere
    ``index_select``, whose CPU backward adds in order.
    """
    if rows.device.type == "cuda" and rows.requires_grad and torch.is_grad_enabled():
        return rows[index]
    return rows.index_select(0, index)


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
    rows = gather_rows(v_rows, flat.reshape(-1)).view(-1, k, channels)  # [B * N', k, C]
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

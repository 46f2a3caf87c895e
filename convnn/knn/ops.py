"""The k-NN core's custom ops and their backward passes (registered with ``torch.library``, so
``torch.compile`` calls the same code as eager), and the CPU step helpers they share.

* :func:`gather_aggregate` / :func:`gather_scaled_sum`: gather neighbour rows and aggregate them in
  cache-sized token steps into reused buffers (no gathered ``[T, k, C]`` tensor), forward and backward;
* :class:`SelectedSimilarity`: the similarities of the selected pairs, differentiable without any
  similarity matrix (``convnn::selected_pairs_grad`` on CPU);
* ``convnn::select``, the chunked selection as one op, is registered beside the code it wraps in
  :mod:`convnn.knn.selection`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from convnn.knn import native
from convnn.knn.native import index_add_rows

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


#: Whether the narrow products of the CPU steps (the selection's scores, the aggregation's gradients)
#: run as oneDNN 1x1 convolutions: where torch runs AVX-512 kernels, whose brgemm convolutions reach
#: about twice the BLAS GEMM's throughput on these shapes. Elsewhere (AVX2) they are BLAS GEMMs, about
#: twice oneDNN's AVX2 kernels on the scores and three times on the weight gradient. The aggregation's
#: forward is a oneDNN convolution on every instruction set (as fast as the GEMM on AVX2).
ONEDNN_PRODUCTS = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _rows_conv_backward(
    rows: Tensor, weight: Tensor, grad: Tensor, weight_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`_rows_conv` for ``grad [S, C']``: ``(rows [S, F], weight [C', F] or None)``,
    by oneDNN's convolution backward where :data:`ONEDNN_PRODUCTS`, else two GEMMs."""
    if rows.shape[0] % CONV_BATCH or not ONEDNN_PRODUCTS:
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


#: Gathered elements per step of :func:`gather_aggregate` / :func:`gather_scaled_sum` (4 MiB of float32:
#: the step stays in cache).
STEP_ELEMENTS = 1 << 20

#: Tokens per step at most: narrow rows make long steps (64 channels x 9 neighbours: 1,820 tokens),
#: whose backward products run slower than those of steps of 1,024 tokens or fewer (AVX2 CPUs).
MAX_STEP_TOKENS = 1024


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
    """A contiguous ``empty_like(x)`` (``zeros``: ``zeros_like(x)``) for each ``(x, wanted)`` that is
    wanted, else an empty tensor: a custom op's "no gradient" (ops return tensors, not None)."""
    like = torch.zeros_like if zeros else torch.empty_like
    return tuple(
        like(x, memory_format=torch.contiguous_format) if wanted else x.new_empty(0) for x, wanted in pairs
    )


def _step(flat: Tensor, v_rows: Tensor) -> int:
    """Tokens per step of :func:`gather_aggregate` / :func:`gather_scaled_sum`: about
    :data:`STEP_ELEMENTS` gathered values, at most :data:`MAX_STEP_TOKENS`, a multiple of
    :data:`CONV_BATCH`."""
    tokens = min(STEP_ELEMENTS // (flat.shape[1] * v_rows.shape[1]), MAX_STEP_TOKENS)
    return max(CONV_BATCH, tokens - tokens % CONV_BATCH)


def _native_steps(rows: Tensor, *others: Tensor | None) -> bool:
    """Whether the native step kernels run a step loop on ``rows`` (:func:`~convnn.knn.native.serves`)
    with ``others`` (None or tensors) of its dtype."""
    return native.serves(rows) and all(t is None or t.dtype == rows.dtype for t in others)


def flat_indices(indices: Tensor, n: int) -> Tensor:
    """Token indices ``[B, N', k]`` of each image's ``n`` rows as indices into the ``B * n`` rows of
    all images (``indices[b] + b * n``), same shape."""
    batch = indices.shape[0]
    return indices + torch.arange(batch, device=indices.device).view(batch, 1, 1) * n


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
    key rows, ``k'`` by adding the rows ``g_ij q_i`` in order (:func:`~convnn.knn.native.index_add_rows`:
    deterministic). Euclidean adds ``-2 q_i sum_j g_ij`` and ``-2 k_j sum_i g_ij`` and doubles."""
    batch, n, p = positions.shape
    m, h = k.shape[1:]
    flat = flat_indices(positions, m)  # rows of k [B * M, h]
    key_rows = k.reshape(batch * m, h)
    size = max(1, STEP_ELEMENTS // max(1, batch * p * h))
    if native.serves(q) and q.dtype == k.dtype == grad.dtype:
        grad_q, grad_k = torch.ops.convnn_native.selected_pairs_grad(q, key_rows, flat, grad, size)
    else:
        grad_q, grad_k = _selected_pairs_steps(q, key_rows, flat, grad, size)
    grad_k = grad_k.view_as(k)
    if kind == "euclidean":  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
        per_key = k.new_zeros(batch * m).index_add_(0, flat.reshape(-1), grad.reshape(-1)).view(batch, m, 1)
        grad_q = 2 * (grad_q - q * grad.sum(-1, keepdim=True))
        grad_k = 2 * (grad_k - k * per_key)
    return grad_q, grad_k


def _selected_pairs_steps(
    q: Tensor, key_rows: Tensor, flat: Tensor, grad: Tensor, size: int
) -> tuple[Tensor, Tensor]:
    """The dot-product part of :func:`_selected_pairs_grad` in steps of ``size`` queries (all images):
    ``q [B, N, h]``, key rows ``[B * M, h]``, ``flat``, ``grad [B, N, p]`` -> ``(q', k' [B * M, h])``."""
    batch, n, p = flat.shape
    h = q.shape[-1]
    grad_q, grad_k = torch.empty_like(q), torch.zeros_like(key_rows, memory_format=torch.contiguous_format)
    for start in range(0, n, size):
        stop = min(start + size, n)
        step, g = flat[:, start:stop].reshape(-1), grad[:, start:stop].unsqueeze(-1)  # g [B, c, p, 1]
        rows = key_rows.index_select(0, step).view(batch, stop - start, p, h)
        grad_q[:, start:stop] = rows.mul_(g).sum(2)
        pair_rows = torch.mul(q[:, start:stop].unsqueeze(2), g, out=rows)  # g_ij q_i, in the same buffer
        index_add_rows(grad_k, step, pair_rows.view(-1, h))
    return grad_q, grad_k


@_selected_pairs_grad.register_fake
def _selected_pairs_grad_fake(q, k, positions, grad, kind):
    return torch.empty_like(q), torch.empty_like(k)


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
    gradient with :func:`~convnn.knn.native.index_add_rows` (in order: deterministic). A custom op, so
    ``torch.compile`` calls these same steps.
    """
    if _native_steps(v_rows, weight, scale):
        return torch.ops.convnn_native.gather_aggregate(
            v_rows, flat, weight, bias, scale, _step(flat, v_rows)
        )
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
    if _native_steps(v_rows, weight, scale, grad):
        step = _step(flat, v_rows)
        args = (grad, v_rows, flat, weight, scale, rows_grad, weight_grad, scale_grad, step, ONEDNN_PRODUCTS)
        return torch.ops.convnn_native.gather_aggregate_backward(*args)
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
    gradient is added with :func:`~convnn.knn.native.index_add_rows` (in order: deterministic). A custom
    op, so ``torch.compile`` calls these same steps.
    """
    if _native_steps(v_rows, w, scale):
        return torch.ops.convnn_native.gather_scaled_sum(v_rows, flat, w, scale, _step(flat, v_rows))
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
    if _native_steps(v_rows, w, scale, grad):
        args = (grad, v_rows, flat, w, scale, rows_grad, w_grad, scale_grad, _step(flat, v_rows))
        return torch.ops.convnn_native.gather_scaled_sum_backward(*args)
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

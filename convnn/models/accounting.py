"""Parameters and GFLOPs of a backbone, by fvcore and by the paper's torch.profiler method
(:func:`profile_model`; the command ``convnn-profile`` is :mod:`convnn.train.profile`)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from convnn.knn import reference_products

with warnings.catch_warnings():  # importing fvcore.nn scripts a loss with torch.jit (deprecated)
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_count, get_shape


def _conv_same_macs(inputs: list, outputs: list) -> int:
    """``aten::_convolution_mode`` (string padding, e.g. ``"same"``): out elements x in-channels x kernel."""
    return conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]), False)


def _sdpa_macs(inputs: list, outputs: list) -> int:
    """``scaled_dot_product_attention(q [.., L, E], k [.., S, E], v [.., S, Ev])``: ``Q Kᵀ`` plus ``A V``."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _baddbmm_macs(inputs: list, outputs: list) -> int:
    """``baddbmm(c, a [B, N, K], b [B, K, M])``: ``B N K M`` (the scaled add is elementwise)."""
    a, b = get_shape(inputs[1]), get_shape(inputs[2])
    return math.prod(a) * b[-1]


def _cdist_macs(inputs: list, outputs: list) -> int:
    """``cdist(x1 [.., P, D], x2 [.., R, D])``: ``P R D`` per batch, as its matmul form costs."""
    return math.prod(get_shape(inputs[0])) * get_shape(inputs[1])[-2]


EXTRA_FVCORE_HANDLES = {
    "aten::_convolution_mode": _conv_same_macs,
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::baddbmm": _baddbmm_macs,
    "aten::cdist": _cdist_macs,
}
"""Matmul-like ops fvcore 0.1.5 does not count (it reports them as unsupported and counts 0)."""


def _one_image(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return (1, *shape)
    if len(shape) == 4 and shape[0] == 1:
        return shape
    raise ValueError(f"input_shape must be (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")


def fvcore_macs(model: nn.Module, x: torch.Tensor, extra_handles: bool = True) -> tuple[int, dict[str, int]]:
    """fvcore's multiply-add count of ``model(x)`` and the ops it could not count (name -> calls).

    ``extra_handles=False`` gives fvcore's own figure (string-padded convs and SDPA counted as 0).
    """
    analysis = FlopCountAnalysis(model, x)
    if extra_handles:
        analysis.set_op_handle(**EXTRA_FVCORE_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():  # fvcore traces with torch.jit, which torch now flags as deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return int(analysis.total()), dict(analysis.unsupported_ops())


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: torch.profiler's C++ side (kineto's USDT and
    device-count lines, "Failed to compute flops" for string-padded convs) writes there directly,
    bypassing ``sys.stderr``. Python-level errors raised in the block still surface after it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


SDPA_EVENT = "aten::scaled_dot_product_attention"


def sdpa_explicit_flops(input_shapes: Sequence[Sequence[int]]) -> int:
    """What torch.profiler counts for the explicit ops one fused SDPA call stands for, ``softmax(Q Kᵀ
    / sqrt(E)) V`` written as two matmuls (the reference's attention): ``2 L S E + 2 L S Ev`` per batch
    and head, for ``q [.., L, E]``, ``k [.., S, E]``, ``v [.., S, Ev]`` (softmax and the scale count 0)."""
    q, k, v = input_shapes[:3]
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def profiler_flops(model: nn.Module, x: torch.Tensor) -> int:
    """The paper's count: ``torch.profiler`` ``with_flops=True``, ``flops`` summed over ``key_averages()``.

    It counts integer-padded ``conv2d`` (2 MACs), ``mm``/``addmm``/``bmm`` (2 M N K) and ``mul``/``add``
    (1 per element), and 0 for everything else (``"same"`` convs, Conv1d, SDPA, norms, top-k, ...). The
    one exception: a fused ``F.scaled_dot_product_attention`` computes the same function as the
    reference's explicit attention matmuls, so each call that ran a fused kernel (nothing counted
    inside it) adds what the profiler counts for those (:func:`sdpa_explicit_flops`); then the same
    model gets the paper's figure whichever kernel runs. The k-NN similarity runs as the reference's
    matmul here (:func:`convnn.knn.reference_products`), not as the CPU's padded oneDNN product.
    """
    with _native_stderr_silenced(), reference_products():
        with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
            model(x)
        counted = sum(event.flops for event in prof.key_averages())
        fused = [e for e in prof.events() if e.name == SDPA_EVENT and not _flops_inside(e)]
        return int(counted + sum(sdpa_explicit_flops(e.input_shapes) for e in fused))


def _flops_inside(event: Any) -> int:
    """FLOPs the profiler counted in the ops ``event`` called (non-zero when SDPA took its math path)."""
    return sum(child.flops + _flops_inside(child) for child in event.cpu_children)


def profile_model(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Parameters and GFLOPs of ``model`` on one random image of ``input_shape`` (``(C, H, W)``).

    Returns ``params``, ``trainable_params``, ``gflops`` (fvcore multiply-adds / 1e9, with handles for the
    matmul-like ops fvcore skips), ``unsupported_ops`` (what fvcore still could not count; elementwise ops,
    norms, top-k, ...), ``gflops_profiler`` (the paper's method; eval mode, batch 1) and ``input_shape``.
    Runs in eval mode under ``no_grad`` on the model's device, then restores the mode; the global RNG
    state is left as it was, so profiling does not shift a seeded run.
    """
    shape = _one_image(input_shape)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        rng_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            x = torch.randn(shape, device=device, dtype=dtype)
            macs, unsupported = fvcore_macs(model, x)
            flops = profiler_flops(model, x)
    finally:
        model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops": macs / 1e9,
        "gflops_profiler": flops / 1e9,
        "unsupported_ops": unsupported,
        "input_shape": list(shape),
    }

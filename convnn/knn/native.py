"""convnn's native CPU kernels (``csrc/kernels.cpp``), built on first use by torch's extension builder.

* :func:`topk_last` is ``torch.topk(dim=-1)`` for the small k of ConvNN: on CPU it runs the native
  kernel (2-4x faster than ``torch.topk`` at k = 8 of 32 ... 1,156 candidates). Both give the same
  values and indices except among tied scores, where the native kernel picks the lower index first
  (``torch.topk`` leaves that order unspecified).
* :func:`index_add_rows` is ``out.index_add_(0, index, src)`` (5-6x faster on CPU, where torch runs
  one kernel per row), deterministic: rows are added in order, threads owning output rows.
* :func:`serves` says whether the step kernels run the k-NN core's chunk and step loops (the
  selection's chunks, the gathers and aggregations of :mod:`convnn.knn.ops` and their backward
  passes): one chunk or step per intra-op thread at once, what several steps add into one tensor
  merged in step order, so results are bitwise identical at every thread count (and to the Python
  loops, except the aggregation's float32 forward on AVX2 CPUs, whose register-tiled product rounds
  differently from oneDNN's).

Elsewhere (CUDA), for k above :data:`MAX_K`, under tracing / compiling, or when the kernels cannot
be built (no C++ compiler: one warning), the Python loops and the torch ops run instead.

The build (about 10 s, once per machine and torch version) is cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), keyed by the CPU capability torch
detects, so nodes of a cluster with different instruction sets never share a binary. The kernels use
torch's OpenMP runtime (the one ``torch.set_num_threads`` sets). ``CONVNN_NATIVE=0`` turns them off.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"

#: The largest k the native kernel serves (its group count); larger k use ``torch.topk``.
MAX_K = 32

#: Compiler flags per CPU capability torch reports (``torch.backends.cpu.get_cpu_capability()``).
ARCH_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}


@functools.cache
def available() -> bool:
    """Whether the native kernels are loaded (building them on first call; False when ``CONVNN_NATIVE=0``
    or when the build fails, with one warning naming the reason)."""
    if os.environ.get("CONVNN_NATIVE", "1") == "0":
        return False
    try:
        build(torch.backends.cpu.get_cpu_capability())
    except Exception as error:  # no compiler, no ninja, a read-only cache: fall back, loudly once
        warnings.warn(
            f"convnn's native kernels could not be built ({type(error).__name__}: {error}); "
            "using torch.topk / index_add_, which are slower on CPU (CONVNN_NATIVE=0 silences this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def build(capability: str) -> None:
    """Build (or find cached) and load the kernels for a CPU ``capability`` ("AVX512", "AVX2", other:
    no instruction-set flags) into this process as ``torch.ops.convnn_native``. One per process."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CPU-only machines
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    cpp_extension.load(
        name=f"convnn_native_{capability.lower()}",
        sources=[str(SOURCE)],
        # OpenMP: at::parallel_for runs on torch's threads (without it, serially); torch's own
        # libgomp.so.1 is already loaded, so the extension binds to that runtime
        extra_cflags=["-O3", "-fopenmp", *ARCH_FLAGS.get(capability, [])],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


def serves(x: Tensor) -> bool:
    """Whether the native kernels serve ``x``: a float32 / float64 CPU tensor in eager mode."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and available()
    )


def topk_last(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries along the last dimension, best first: ``[..., M] -> ([..., k], [..., k])``.

    ``scores`` may be a column slice of a wider tensor (e.g. ``[b, c, M]`` of ``[b, c, M + pad]``).
    """
    if not (1 <= k <= MAX_K and scores.stride(-1) == 1 and serves(scores)):
        return scores.topk(k, dim=-1)
    lead = scores.shape[:-1]
    values, indices = torch.ops.convnn_native.topk_rows(scores.reshape(-1, scores.shape[-1]), k)
    return values.view(*lead, k), indices.view(*lead, k)


def index_add_rows(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``out [L, C] += src [R, C]`` at rows ``index [R]`` (``out.index_add_(0, index, src)``) -> ``out``."""
    if not (out.is_contiguous() and out.dtype == src.dtype and serves(out)):
        return out.index_add_(0, index, src)
    torch.ops.convnn_native.index_add_rows(out, index, src)
    return out

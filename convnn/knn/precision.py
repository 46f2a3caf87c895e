"""Float32 matmul precision: the selection computes its similarities in full (IEEE) float32 whatever
the process-wide setting, so TF32 / bf16 rounding (``torch.set_float32_matmul_precision("high")``,
``torch.backends.cuda.matmul.allow_tf32 = True``, Lightning's start-up hint) never moves near-tied
neighbours; :func:`matmul_precisions` reports the settings a run trains with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The backends whose float32 products the selection runs (the similarity's matmul on CUDA, its
#: matmul and oneDNN 1x1 convolution on CPU), by their ``torch.backends`` path.
SELECTION_BACKENDS = ("cuda.matmul", "mkldnn.matmul", "mkldnn.conv")

#: The backends a run's record names (the projections' 1x1 convolutions run on cuDNN on CUDA).
RECORDED_BACKENDS = ("cuda.matmul", "cudnn.conv", "mkldnn.matmul", "mkldnn.conv")


def _backend(path: str) -> object:
    node: object = torch.backends
    for part in path.split("."):
        node = getattr(node, part)
    return node


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Within the block float32 matmuls and oneDNN convolutions run in IEEE float32; every setting is
    restored on exit. Host flags only: no sync, nothing on the device. Also a decorator.

    torch keeps two APIs in step: the legacy ``torch.set_float32_matmul_precision`` and each backend's
    ``fp32_precision``; a cuBLAS matmul stops with an error when they disagree, so the block sets the
    legacy one to "highest" (which makes both matmul backends "ieee") and the backends of
    :data:`SELECTION_BACKENDS` to "ieee", and restores both in the same order. When the legacy getter
    itself refuses (the process mixed the two APIs), only the backends are set.
    """
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    saved = [(_backend(path), _backend(path).fp32_precision) for path in SELECTION_BACKENDS]
    try:
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")
        for backend, _ in saved:
            backend.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, precision in saved:
            backend.fp32_precision = precision


def matmul_precisions() -> dict[str, str]:
    """The float32 precision each of :data:`RECORDED_BACKENDS` runs with now ("ieee", "tf32", "bf16";
    torch resolves "none" to the process-wide ``torch.backends.fp32_precision``), plus ``selection``:
    "ieee" (:func:`full_fp32`)."""
    return {**{path: _backend(path).fp32_precision for path in RECORDED_BACKENDS}, "selection": "ieee"}

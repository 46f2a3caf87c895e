"""How a run computes on its device: whether it trains on a GPU, its determinism, and what its
record says about both (with the float32 precisions and the data feed).

Default GPU runs are repeatable: ``trainer.deterministic`` unset (null) makes Lightning turn on
torch's deterministic algorithms in warn mode (deterministic kernels wherever torch has one, cuDNN
included; a warning, not a stop, for an op that has none), and the k-NN layers' own gathers are
deterministic on CUDA without it (:func:`convnn.knn.gather_rows`). On the CPU the flag stays off:
the CPU kernels here add in a fixed order already.
"""

from __future__ import annotations

from typing import Any

from convnn.knn.precision import matmul_precisions
from convnn.train.config import TrainerConfig


def on_gpu(trainer: TrainerConfig) -> bool:
    """Whether a run with ``trainer`` trains on CUDA devices: its accelerator, once resolved
    (:func:`~convnn.train.device.resolve_accelerator`: "auto" becomes "gpu" or "cpu"), is "gpu"."""
    return trainer.accelerator == "gpu"


def deterministic_mode(trainer: TrainerConfig, gpu: bool) -> bool | str:
    """Lightning's ``deterministic`` for a run: ``trainer.deterministic`` when set (true: every op must
    have a deterministic kernel; false: off); unset, "warn" on a GPU and False on the CPU."""
    if trainer.deterministic is not None:
        return trainer.deterministic
    return "warn" if gpu else False


def numerics_record(trainer: TrainerConfig, gpu: bool) -> dict[str, Any]:
    """The run record's ``numerics``: the deterministic mode (:func:`deterministic_mode`), the autocast
    precision and each backend's float32 precision at start-up
    (:func:`~convnn.knn.precision.matmul_precisions`; the k-NN selection always "ieee")."""
    return {
        "deterministic": deterministic_mode(trainer, gpu),
        "precision": trainer.precision,
        "float32": matmul_precisions(),
    }

"""The GPUs of one machine as a pool for a local sweep: which ids there are, how many GPUs a job
takes, and which job holds which (``hydra/launcher=local``, see
``hydra_plugins/convnn_sweeper/local_launcher.py``). Ids are what ``CUDA_VISIBLE_DEVICES`` takes: indices
or ``GPU-``/``MIG-`` UUIDs, kept as strings."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from omegaconf import OmegaConf


class GpuPoolError(ValueError):
    """A pool that cannot serve the jobs; ``str(error)`` is one line naming what to change."""


def detected_gpus(env: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPU ids this machine offers its jobs: the entries of ``CUDA_VISIBLE_DEVICES`` when it is set
    (as a job scheduler sets it), else ``0 .. N-1`` for the ``count`` CUDA devices (default: what
    ``torch.cuda.device_count()`` sees)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if count is None:
        import torch

        count = torch.cuda.device_count()
    return [str(i) for i in range(count)]


def gpus_per_job(accelerator: str, devices: int, detected: int | None = None) -> int:
    """GPUs one local job holds for ``trainer.accelerator`` / ``trainer.devices``: ``devices`` on
    ``gpu``, none on ``cpu``, and on ``auto`` ``devices`` when the machine shows a GPU (``detected``,
    default :func:`detected_gpus`), else none (the job trains on the CPU)."""
    if accelerator == "gpu":
        return devices
    if accelerator == "auto":
        shown = len(detected_gpus()) if detected is None else detected
        return devices if shown else 0
    return 0


OmegaConf.register_new_resolver("convnn_local_gpus_per_job", gpus_per_job, replace=True)


def gpu_pool(
    declared: Sequence[int | str] | None, per_job: int, detected: Sequence[str] | None = None
) -> list[str]:
    """The pool a local sweep hands out: ``declared`` (``hydra.launcher.visible_gpus``) or else the
    ``detected`` ids (default :func:`detected_gpus`). Raises :class:`GpuPoolError` (one line) when a
    job asks more GPUs than the pool holds or an id is declared twice; ``[]`` for CPU jobs."""
    if per_job == 0:
        return []
    if declared is None:
        pool = list(detected_gpus() if detected is None else detected)
        where = "this machine shows" if pool else "this machine shows no GPU"
    else:
        pool = [str(g).strip() for g in declared]
        where = "hydra.launcher.visible_gpus declares"
        twice = sorted({g for g in pool if pool.count(g) > 1})
        if twice:
            raise GpuPoolError(f"hydra.launcher.visible_gpus={list(declared)} names {twice} more than once")
    if per_job > len(pool):
        have = f" {len(pool)}: {pool}" if pool else ""
        raise GpuPoolError(
            f"each job asks {per_job} GPU{'s' * (per_job > 1)} "
            "(trainer.devices / hydra.launcher.gpus_per_node) "
            f"but {where}{have}; declare the GPUs with hydra.launcher.visible_gpus=[0,1,...] or train on "
            "the CPU with trainer=cpu"
        )
    return pool


class GpuPool:
    """The free GPU ids of a pool: :meth:`take` hands ``n`` of them to a job, :meth:`give` returns
    them when it ends, so two running jobs never share a GPU."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.free = list(ids)

    def take(self, n: int) -> list[str] | None:
        """``n`` free ids (in pool order), or ``None`` when fewer are free."""
        if n > len(self.free):
            return None
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def give(self, ids: Sequence[str]) -> None:
        """Return ``ids`` (taken earlier) to the pool."""
        self.free.extend(ids)

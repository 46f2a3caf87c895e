"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher with three changes for sweeps.

- ``launch`` submits the jobs as one array like the stock launcher, then waits for every one of
  them: a job that died without a result (scancel, a time limit past ``max_num_timeout``, a node
  failure, an OOM kill) becomes a failed job whose reason names its SLURM state and log, so the
  paper sweeper lists it in its summary. The stock launcher raises on the first such job and leaves
  the others unread, and waits forever for an array task cancelled while pending (sacct never
  lists it): here a job that has left ``squeue`` without a result for ``RESULT_GRACE_S`` fails.
- the default ``trainer=auto`` asks SLURM for no GPU (the submitting host cannot see the compute
  nodes): ``launch`` warns once, naming ``trainer=gpu`` / ``trainer=ddp``.
- ``checkpoint`` (submitit's requeue on USR2 before the time limit, or on pre-emption) drops
  ``overwrite`` and ``resume`` from the job's overrides: the requeued job continues its run from its
  last checkpoint (``resume`` defaults to true) instead of starting it afresh again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from convnn.runs.slurm import queued_job_ids

log = logging.getLogger(__name__)

POLL_S = 5.0  # how often a waiting launch asks squeue
RESULT_GRACE_S = 15.0  # how long a job that left the queue may take to show its result (as submitit)

RESTART_DROPS = ("overwrite", "resume")  # a requeued job resumes whatever the first launch said


class SlurmJobError(RuntimeError):
    """A SLURM job of the sweep that ended without a result, or whose process raised past Hydra."""


def _reason(job: Any, error: Exception) -> SlurmJobError:
    """One line for a job whose ``results()`` raised ``error`` (submitit's ``UncompletedJobError``)."""
    from submitit.core.utils import FailedJobError

    if isinstance(error, FailedJobError):
        last = [line for line in str(error).splitlines() if line.strip()][-1]
        return SlurmJobError(f"SLURM job {job.job_id} raised {last.strip()}; see {job.paths.stderr}")
    return SlurmJobError(f"SLURM job {job.job_id} ended {job.state} without a result; see {job.paths.stderr}")


def _wait(job: Any) -> None:
    """Until ``job`` is done (its result file, or a final state in sacct); raises
    :class:`SlurmJobError` once SLURM no longer holds it and no result came for ``RESULT_GRACE_S``."""
    left_at = None
    while not job.done():
        held = queued_job_ids()
        if held is None or job.job_id in held:
            left_at = None
        elif left_at is None:
            left_at = time.monotonic()
        elif time.monotonic() - left_at > RESULT_GRACE_S:
            raise SlurmJobError(
                f"SLURM job {job.job_id} left the queue without a result (sacct: {job.state}); "
                f"see {job.paths.stderr}"
            )
        time.sleep(POLL_S)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """See the module docstring; every ``hydra.launcher`` field works as in the stock launcher."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """The requeued job: the same job without ``overwrite`` / ``resume``, so it resumes."""
        kept = [o for o in sweep_overrides if o.split("=", 1)[0].lstrip("+~") not in RESTART_DROPS]
        return super().checkpoint(kept, *args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Submit ``job_overrides`` as one array job and return every job's result (a failed
        ``JobReturn`` holding a :class:`SlurmJobError` for a job that ended without one)."""
        import submitit
        from submitit.core.utils import UncompletedJobError

        assert self.config is not None
        params = dict(self.params)
        if OmegaConf.select(self.config, "trainer.accelerator") == "auto" and not params.get("gpus_per_node"):
            log.warning(
                "hydra/launcher=slurm with trainer=auto asks SLURM for no GPU, so the jobs train on the CPU; "
                "add trainer=gpu (one GPU per job) or trainer=ddp trainer.devices=N"
            )
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params.pop("submitit_folder"),
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        calls = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            calls.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        jobs = executor.map_array(self, *zip(*calls, strict=True))
        results = []
        for job, overrides in zip(jobs, job_overrides, strict=True):
            try:
                _wait(job)
                results.append(job.results()[0])
            except (UncompletedJobError, SlurmJobError) as e:
                error = e if isinstance(e, SlurmJobError) else _reason(job, e)
                log.error(str(error))
                results.append(
                    JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)
                )
        return results

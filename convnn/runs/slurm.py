"""SLURM: who the running job is, who owns requeueing, and which of a sweep's jobs are still queued.

Requeueing belongs to submitit (the launcher): on ``--signal=USR2@signal_delay_s`` before the time
limit (or on pre-emption) it requeues the job with the same overrides, and the job resumes from
``checkpoints/last.ckpt``. Lightning's own SLURM auto-requeue (SIGUSR1 -> ``hpc_ckpt_*.ckpt`` in the
run directory, restored whenever ``ckpt_path=None`` under SLURM) is switched off and its files are
removed before every start, so a fresh start never restores old state.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's auto-requeue checkpoints, in the trainer's root dir
SQUEUE_TIMEOUT_S = 60


def gpus_per_node(accelerator: str, devices: int) -> int:
    """GPUs a SLURM job asks per node for ``trainer.accelerator`` / ``trainer.devices``: the trainer's
    devices on ``gpu``, none otherwise (the launcher's default ``gpus_per_node``)."""
    return devices if accelerator == "gpu" else 0


OmegaConf.register_new_resolver("convnn_gpus_per_node", gpus_per_node, replace=True)


def job_info() -> dict[str, Any] | None:
    """The SLURM job this process runs in (the record's ``launcher``; ``None`` outside a sweep):
    ``scheduler`` (``slurm``), ``job_id`` as squeue and submitit's log names show it (``<array
    job>_<index>`` for an array task), ``array_job_id``, ``array_task_id``, ``node``,
    ``restart_count`` (requeues so far) and the submitit ``log`` (stdout) when submitit ran it. A job
    of ``hydra/launcher=local``: ``scheduler`` ``local``, ``job_id`` (``<sweep pid>_<index>``), the
    ``gpus`` it was given (``CUDA_VISIBLE_DEVICES``) and its ``log``."""
    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") == "local":
        import submitit

        return {
            "scheduler": "local",
            "job_id": env.get("SUBMITIT_LOCAL_JOB_ID"),
            "gpus": env.get("CUDA_VISIBLE_DEVICES"),
            "log": str(submitit.JobEnvironment().paths.stdout),
        }
    if "SLURM_JOB_ID" not in env:
        return None
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    info: dict[str, Any] = {
        "scheduler": "slurm",
        "job_id": f"{array_job}_{task}" if array_job and task else env["SLURM_JOB_ID"],
        "array_job_id": array_job,
        "array_task_id": int(task) if task else None,
        "node": env.get("SLURMD_NODENAME"),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", 0)),
        "log": None,
    }
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit

        info["log"] = str(submitit.JobEnvironment().paths.stdout)
    return info


def requeued_by_submitit(error: BaseException) -> bool:
    """Whether ``error`` is submitit's exit after requeueing this job (``sys.exit(-1)`` from its USR2
    handler, the only ``SystemExit(-1)`` in a submitit job)."""
    return isinstance(error, SystemExit) and error.code == -1 and "SUBMITIT_EXECUTOR" in os.environ


def lightning_plugins() -> list[Any]:
    """Trainer plugins: under SLURM, the SLURM environment with Lightning's auto-requeue off
    (submitit owns requeueing); elsewhere none."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def remove_hpc_checkpoints(run_dir: Path) -> list[Path]:
    """Delete Lightning's ``hpc_ckpt_*.ckpt`` from ``run_dir`` (Lightning would restore the newest one
    on any start with ``ckpt_path=None`` under SLURM); returns the deleted paths."""
    found = sorted(run_dir.glob(HPC_CHECKPOINTS))
    for path in found:
        path.unlink(missing_ok=True)
    return found


def queued_job_ids() -> set[str] | None:
    """Ids (``123`` or ``123_4`` per array task) of the jobs SLURM holds now (pending, running,
    requeued, completing); ``None`` where there is no ``squeue`` or it fails (no scheduler)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i"],
            capture_output=True,
            text=True,
            timeout=SQUEUE_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("squeue failed (%s); assuming no job of this sweep is queued", e)
        return None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def queued_jobs(submitit_folder: str) -> dict[str, list[str]]:
    """Job id -> overrides of every job submitit submitted into ``submitit_folder`` (the launcher's,
    with ``%j``) that SLURM still holds: a re-launched sweep must not submit these again."""
    ids = queued_job_ids()
    if not ids:
        return {}
    from submitit.core.utils import DelayedSubmission, JobPaths

    found = {}
    for job_id in sorted(ids):
        pickle = JobPaths(submitit_folder, job_id=job_id).submitted_pickle
        if not pickle.is_file():
            continue
        try:
            found[job_id] = list(DelayedSubmission.load(pickle).args[0])
        except Exception as e:  # noqa: BLE001 - e.g. rewritten by a requeue right now
            log.warning("cannot read %s (%s)", pickle, e)
    return found

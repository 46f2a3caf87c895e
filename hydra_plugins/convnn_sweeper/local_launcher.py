"""``hydra/launcher=local``: a sweep's jobs as local processes, queued, one GPU set per job.

Each job runs the same code as a SLURM job: submitit pickles the launcher and its overrides, and a
fresh ``python -m submitit.core._submit`` process (with ``SUBMITIT_EXECUTOR=local``) runs Hydra's job
(``BaseSubmititLauncher.__call__``: the run directory, record, lock, skip and resume of
``convnn-train``). What differs from submitit's local executor:

- a queue: at most ``slots`` jobs run at once and a job starts as soon as one ends (not in batches
  that wait for their slowest job). GPU jobs (``gpus_per_node`` > 0) hold ``gpus_per_node`` ids of the
  pool (``visible_gpus``, or what the machine shows) in ``CUDA_VISIBLE_DEVICES``, so two running jobs
  never share a GPU and ``slots`` = pool size // ``gpus_per_node``; CPU jobs see no GPU and ``slots``
  comes from the cores and memory (:func:`default_local_parallelism`). ``hydra.sweeper.local_parallelism``
  caps either;
- a job process that dies without a result (SIGKILL from the OOM killer, a segfault) is a failed job
  whose reason names the signal and its log; the other jobs still run and the sweeper prints its
  summary. The launcher is the job's parent, so it sees the signal;
- a job stopped by SIGINT / SIGTERM (exit 130 / 143), or Ctrl-C in the sweep's terminal, stops the
  queue: the running jobs end (they record "interrupted"), the rest are not launched.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, List, Optional  # noqa: UP035 - OmegaConf structured configs need these

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from convnn.runs.errors import EXIT_BAD_INPUT, EXIT_SIGINT, EXIT_SIGTERM
from convnn.runs.gpus import GpuPool, GpuPoolError, gpu_pool
from convnn.train.threads import job_cores

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the queue looks for ended jobs
GIB_PER_LOCAL_JOB = 4  # one VGG-11 job at batch 256 peaks at about 4.2 GB
STOP_CODES = (EXIT_SIGINT, EXIT_SIGTERM)  # a job stopped by a signal stops the queue


@dataclass
class LocalLauncherConf:
    """``gpus_per_node``: GPUs per job (``configs/hydra/launcher/local.yaml`` derives it from the
    trainer); ``visible_gpus``: the pool (null: ``CUDA_VISIBLE_DEVICES`` or every GPU the machine
    shows); ``cpus_per_task``: cores per process of a CPU job, for the default cap; ``tasks_per_node``:
    processes per job (``trainer.devices``: a CPU DDP job runs one per device)."""

    _target_: str = "hydra_plugins.convnn_sweeper.local_launcher.LocalLauncher"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    gpus_per_node: int = 0
    visible_gpus: Optional[List[Any]] = None  # noqa: UP006, UP045
    cpus_per_task: int = 1
    tasks_per_node: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="convnn_local", node=LocalLauncherConf, provider="convnn"
)


def default_local_parallelism(
    cpus_per_task: int, cpus: int | None = None, mem_gib: float | None = None
) -> int:
    """CPU jobs the machine holds at once: the cores this process may use (its affinity, at most
    SLURM's allocation: :func:`~convnn.train.threads.job_cores`) over ``cpus_per_task``, and at most
    one per ``GIB_PER_LOCAL_JOB`` GiB of memory; at least 1."""
    cpus = cpus or job_cores()[0]
    if mem_gib is None:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cpus // max(1, cpus_per_task), int(mem_gib // GIB_PER_LOCAL_JOB)))


class LocalJobError(RuntimeError):
    """A local job that ended without a result, or whose process raised past Hydra; ``code`` is the
    shell's 128 + N for a job killed by signal N (``None`` otherwise)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class JobNotLaunched(RuntimeError):
    """A job the queue did not start because the sweep was stopped (SIGINT / SIGTERM)."""


@dataclass
class _Running:
    """A started job: its index, overrides, process, submitit job (paths) and GPU ids."""

    index: int
    overrides: list[str]
    process: subprocess.Popen
    job: Any
    gpus: list[str]


def _ended(run: _Running) -> JobReturn:
    """The ``JobReturn`` of an ended job: Hydra's own (success, or a failure its task raised), else a
    failed one whose :class:`LocalJobError` names the signal or exit code and the job's log."""
    from submitit.core.utils import FailedJobError

    job, code = run.job, run.process.returncode
    if job.paths.result_pickle.exists():
        try:
            return job.results()[0]
        except FailedJobError as e:
            last = [line for line in str(e).splitlines() if line.strip()][-1].strip()
            error = LocalJobError(f"local job {job.job_id} raised {last}; see {job.paths.stderr}")
    elif code < 0:
        name = signal.Signals(-code).name
        hint = " (the OOM killer sends it when memory runs out)" if -code == signal.SIGKILL else ""
        error = LocalJobError(
            f"local job {job.job_id} was killed by signal {-code} ({name}){hint}; see {job.paths.stderr}",
            128 - code,
        )
    else:
        error = LocalJobError(
            f"local job {job.job_id} exited {code} without a result; see {job.paths.stderr}"
        )
    return JobReturn(overrides=run.overrides, status=JobStatus.FAILED, _return_value=error)


def _stops(ret: JobReturn) -> bool:
    """Whether an ended job was stopped by SIGINT / SIGTERM: it recorded so and exited 130 / 143 (its
    ``RunError`` code), or the signal killed its process (:class:`LocalJobError` code 130 / 143)."""
    return ret.status != JobStatus.COMPLETED and getattr(ret._return_value, "code", None) in STOP_CODES


class LocalLauncher(BaseSubmititLauncher):
    """See the module docstring; ``__call__`` (the job body) and ``checkpoint`` are submitit's."""

    _EXECUTOR = "local"

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        """Check the GPU pool against the jobs' needs before anything runs: one line and exit 2 when
        the jobs ask more GPUs than it holds."""
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        try:
            self.pool = gpu_pool(self.params.get("visible_gpus"), self.gpus_per_job)
        except GpuPoolError as e:
            print(f"convnn-train: error: hydra/launcher=local: {e}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    @property
    def gpus_per_job(self) -> int:
        return int(self.params.get("gpus_per_node") or 0)

    @property
    def tasks_per_job(self) -> int:
        return max(1, int(self.params.get("tasks_per_node") or 1))

    def slots(self) -> int:
        """Jobs run at once: the pool over the GPUs per job (GPU jobs), or the cores and memory over
        the cores of a job's processes (CPU jobs); ``hydra.sweeper.local_parallelism`` caps both."""
        cap = OmegaConf.select(self.config, "hydra.sweeper.local_parallelism", default=None)
        if self.gpus_per_job:
            return min(len(self.pool) // self.gpus_per_job, cap or len(self.pool))
        per_task = int(self.params.get("cpus_per_task") or 1)
        return cap or default_local_parallelism(per_task * self.tasks_per_job)

    def cpu_threads(self) -> int | None:
        """Torch threads of each process of a CPU job: the job's share of the machine's cores among
        the jobs running at once, split between its processes (a CPU DDP job's ``tasks_per_node``), so
        side-by-side jobs do not oversubscribe the cores; ``None`` (the job decides) where
        ``OMP_NUM_THREADS`` is set."""
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, job_cores()[0] // self.slots() // self.tasks_per_job)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Run ``job_overrides`` through the queue; every job's ``JobReturn``, in order."""
        from submitit.core.utils import JobPaths

        from convnn.runs.local_jobs import QueueExecutor

        assert self.config is not None
        slots, pool = self.slots(), GpuPool(self.pool)
        each = f", {self.gpus_per_job} GPU{'s' * (self.gpus_per_job > 1)} each of {self.pool}"
        tasks = f", {self.tasks_per_job} processes each" if self.tasks_per_job > 1 else ""
        kind = each if self.gpus_per_job else f" (CPU jobs{tasks})"
        log.info(f"hydra/launcher=local: {slots} jobs at a time{kind}")
        executor = QueueExecutor(self.params["submitit_folder"])
        JobPaths.get_first_id_independent_folder(executor.folder).mkdir(parents=True, exist_ok=True)
        pending = deque(enumerate(job_overrides, start=initial_job_idx))
        running: list[_Running] = []
        results: dict[int, JobReturn] = {}
        stopping = False
        while running or (pending and not stopping):
            while pending and not stopping and len(running) < slots:
                gpus = pool.take(self.gpus_per_job)
                if gpus is None:
                    break
                index, overrides = pending.popleft()
                running.append(self._start(executor, index, list(overrides), gpus))
            try:
                time.sleep(POLL_S)
            except KeyboardInterrupt:
                if stopping:
                    raise
                stopping = True
                log.warning(f"interrupted: waiting for the {len(running)} running jobs; launching no more")
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                pool.give(run.gpus)
                results[run.index] = ret = _ended(run)
                if _stops(ret) and not stopping:
                    stopping = True
                    log.warning(f"job #{run.index} was interrupted: launching no more jobs")
        for index, overrides in pending:
            error = JobNotLaunched("not launched: the sweep was stopped; re-run it to continue")
            results[index] = JobReturn(
                overrides=list(overrides), status=JobStatus.FAILED, _return_value=error
            )
        return [results[i] for i in sorted(results)]

    def _start(self, executor: Any, index: int, overrides: list[str], gpus: list[str]) -> _Running:
        """Start job ``index`` in its own process, seeing only ``gpus``."""
        shown = f" on GPU {','.join(gpus)}" if gpus else ""
        log.info(f"\t#{index}{shown} : {' '.join(filter_overrides(overrides))}")
        executor.job_id = f"{os.getpid()}_{index}"
        executor.cuda_visible_devices = ",".join(gpus)
        executor.threads = self.cpu_threads() if not gpus else None
        job = executor.submit(
            self, overrides, "hydra.sweep.dir", index, f"job_id_for_{index}", Singleton.get_state()
        )
        return _Running(index, overrides, executor.process, job, gpus)

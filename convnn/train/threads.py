"""Torch threads for a training job, chosen from the cores it may use beside its data-loader workers.

A job's cores are the CPUs its process may run on (``os.sched_getaffinity``: ``taskset``, a cgroup
cpuset, SLURM's task binding), at most SLURM's allocation where there is one (``SLURM_CPUS_PER_TASK``),
shared by the job's processes on the node (``trainer.devices`` DDP processes started by Lightning
outside SLURM; under SLURM every process is a task with its own allocation). The workers are the data
feed's (:func:`convnn.train.data.data_feed`: ``data.num_workers``, or its default for the device).

Defaults (:func:`plan`): CPU training runs torch threads on every core; GPU training leaves one core
per worker and runs the rest (at least 1) as torch threads. ``trainer.threads`` (else
``OMP_NUM_THREADS``) sets the threads. Where an explicit ``data.num_workers`` and the threads together
exceed the cores of a CPU run, idle torch threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, unless
set) so they leave the cores to the workers instead of spinning; the OpenMP runtime reads that when
torch loads, so it applies in a fresh job process (``convnn-train``, a sweep's launched jobs). What
was chosen and why goes into the run record (:meth:`ThreadPlan.record`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ThreadPlan:
    """The torch threads and data-loader workers of one job process and where each came from."""

    cores: int
    threads: int
    workers: int
    threads_from: str  # "auto", "trainer.threads" or "OMP_NUM_THREADS"
    workers_from: str  # "auto" or "data.num_workers"
    affinity: list[int]
    slurm_cpus_per_task: int | None
    wait_policy: str | None  # OMP_WAIT_POLICY in effect for torch's threads (None: the runtime's default)

    def record(self) -> dict:
        """The plan as the run record's ``threads`` field."""
        return asdict(self)


def job_cores(environ: dict[str, str] | None = None) -> tuple[int, list[int], int | None]:
    """``(cores, affinity, SLURM_CPUS_PER_TASK or None)``: the CPUs this process may run on, at most
    SLURM's per-task allocation."""
    environ = os.environ if environ is None else environ
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = list(range(os.cpu_count() or 1))
    slurm = environ.get("SLURM_CPUS_PER_TASK")
    slurm_cpus = int(slurm) if slurm and slurm.isdigit() and int(slurm) > 0 else None
    return min(len(affinity), slurm_cpus or len(affinity)), affinity, slurm_cpus


def plan(
    gpu: bool,
    devices: int,
    threads: int | None,
    workers: int,
    workers_set: bool,
    environ: dict[str, str] | None = None,
) -> ThreadPlan:
    """The job's :class:`ThreadPlan`: ``gpu`` training or not on ``devices`` devices, ``threads``
    (``trainer.threads``, None for auto) beside ``workers`` loader workers (``workers_set``: from an
    explicit ``data.num_workers``)."""
    environ = os.environ if environ is None else environ
    cores, affinity, slurm_cpus = job_cores(environ)
    if devices > 1 and slurm_cpus is None:  # Lightning starts the other processes on this node
        cores = max(1, cores // devices)
    omp = environ.get("OMP_NUM_THREADS", "")
    if threads is not None:
        threads_from = "trainer.threads"
    elif omp.isdigit() and int(omp) > 0:
        threads, threads_from = int(omp), "OMP_NUM_THREADS"
    else:
        threads = max(1, cores - workers) if gpu else cores
        threads_from = "auto"
    workers_from = "data.num_workers" if workers_set else "auto"
    wait_policy = environ.get("OMP_WAIT_POLICY") or None
    if wait_policy is None and not gpu and workers_set and workers > 0 and threads + workers > cores:
        wait_policy = "PASSIVE"
    return ThreadPlan(cores, threads, workers, threads_from, workers_from, affinity, slurm_cpus, wait_policy)


def prepare(job: ThreadPlan) -> None:
    """Set ``OMP_WAIT_POLICY`` to ``job``'s where it asks for one, the environment has none and torch
    is not imported yet (the OpenMP runtime reads it when torch loads it)."""
    if job.wait_policy and "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = job.wait_policy


def apply(job: ThreadPlan) -> ThreadPlan:
    """Make ``job`` this process's setting (:func:`prepare`, then ``torch.set_num_threads``). Returns
    the plan as it took effect (``wait_policy`` None where torch was loaded before it could be set)."""
    prepare(job)
    if job.wait_policy != os.environ.get("OMP_WAIT_POLICY"):
        job = replace(job, wait_policy=None)
    import torch

    torch.set_num_threads(job.threads)
    return job

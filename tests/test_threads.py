"""The thread and worker policy (convnn/train/threads.py): what a job chooses for the cores it may use
(its real CPU affinity, set with ``os.sched_setaffinity``; SLURM's allocation; DDP processes on one
node), explicit settings, and what a ``convnn-train`` run records."""

import json
import os
import subprocess
import sys

import pytest

from convnn.train.threads import job_cores, plan

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs a machine with 2 or more CPUs")


@pytest.fixture
def affinity():
    """Set this thread's CPU affinity for the test (``affinity(cpus)``), restored afterwards."""
    before = os.sched_getaffinity(0)
    yield lambda cpus: os.sched_setaffinity(0, cpus)
    os.sched_setaffinity(0, before)


def chosen(
    gpu: bool, workers: int, threads=None, workers_set=False, devices: int = 1, **environ: str
) -> tuple:
    job = plan(gpu, devices, threads, workers, workers_set, environ)
    return job.cores, job.threads, job.workers, job.threads_from, job.workers_from, job.wait_policy


def test_a_cpu_job_runs_torch_threads_on_every_core(affinity):
    affinity({CPUS[0]})
    assert chosen(False, 0) == (1, 1, 0, "auto", "auto", None)
    assert job_cores({}) == (1, [CPUS[0]], None)


@needs_two_cpus
def test_a_cpu_job_on_two_cores_and_a_gpu_job_splits_them(affinity):
    affinity(set(CPUS[:2]))
    assert chosen(False, 2) == (2, 2, 2, "auto", "auto", None)  # default workers: the runtime's wait
    assert chosen(True, 1) == (2, 1, 1, "auto", "auto", None)  # 1 decoding worker, 1 torch thread


def test_a_gpu_job_keeps_one_thread_on_one_core(affinity):
    affinity({CPUS[0]})
    assert chosen(True, 1) == (1, 1, 1, "auto", "auto", None)


@needs_two_cpus
def test_slurm_cpus_per_task_caps_the_cores(affinity):
    affinity(set(CPUS[:2]))
    assert chosen(False, 0, SLURM_CPUS_PER_TASK="1")[:3] == (1, 1, 0)
    assert chosen(False, 0, SLURM_CPUS_PER_TASK="64")[:3] == (2, 2, 0)  # at most the affinity
    assert plan(False, 1, None, 0, False, {"SLURM_CPUS_PER_TASK": "1"}).slurm_cpus_per_task == 1


@needs_two_cpus
def test_ddp_processes_started_on_one_node_share_its_cores(affinity):
    affinity(set(CPUS[:2]))
    assert chosen(False, 0, devices=2)[:3] == (1, 1, 0)
    assert chosen(False, 0, devices=2, SLURM_CPUS_PER_TASK="2")[:3] == (2, 2, 0)  # SLURM: a task each


def test_explicit_settings_win_and_say_where_they_came_from(affinity):
    affinity({CPUS[0]})
    assert chosen(False, 0, OMP_NUM_THREADS="3")[1:4] == (3, 0, "OMP_NUM_THREADS")
    assert chosen(False, 0, threads=2, OMP_NUM_THREADS="3")[1:4] == (2, 0, "trainer.threads")
    assert chosen(False, 0, OMP_NUM_THREADS="junk")[1:4] == (1, 0, "auto")
    assert chosen(True, 0, workers_set=True)[1:5] == (1, 0, "auto", "data.num_workers")


def test_workers_beside_every_core_busy_with_threads_wait_passively(affinity):
    """CPU job, explicit workers and threads more than the cores: idle torch threads must not spin."""
    affinity({CPUS[0]})
    assert chosen(False, 1, workers_set=True)[2:] == (1, "auto", "data.num_workers", "PASSIVE")
    assert chosen(False, 1, workers_set=True, OMP_WAIT_POLICY="ACTIVE")[-1] == "ACTIVE"  # the user's own
    assert chosen(True, 1, workers_set=True)[-1] is None  # GPU: the threads leave the worker its core


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["data.num_workers=null"],
            {"threads": 1, "workers": 0, "workers_from": "auto", "wait_policy": None},
        ),
        pytest.param(
            ["data.num_workers=1"],
            {"threads": 1, "workers": 1, "workers_from": "data.num_workers", "wait_policy": "PASSIVE"},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_convnn_train_records_what_it_chose_for_its_affinity(overrides, expected, tmp_path):
    """A real ``convnn-train`` process on one CPU (``os.sched_setaffinity`` before it starts): the
    record's ``threads`` field, and the threads and ``OMP_WAIT_POLICY`` the process ran with."""
    args = [
        f"out_dir={tmp_path}",
        "data=synthetic",
        "data.train_size=32",
        "data.test_size=16",
        "batch_size=16",
        "model=vgg11",
        "model.width_mult=0.125",
        "model.hidden_features=16",
        "layer=conv2d",
        "epochs=1",
        "trainer.progress_bar=none",
        "logger=none",
        *overrides,
    ]
    script = (
        "import atexit, os, sys\n"
        f"os.sched_setaffinity(0, {{{CPUS[0]}}})\n"
        "def report():\n"
        "    import torch\n"
        "    print('RAN', torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))\n"
        "atexit.register(report)\n"
        "sys.argv = ['convnn-train', *sys.argv[1:]]\n"
        "from convnn.train.app import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.pop("SLURM_CPUS_PER_TASK", None)
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record_path,) = tmp_path.rglob("results.json")
    threads = json.loads(record_path.read_text())["threads"]
    assert threads["cores"] == 1 and threads["affinity"] == [CPUS[0]] and threads["threads_from"] == "auto"
    assert {key: threads[key] for key in expected} == expected
    assert f"RAN 1 {expected['wait_policy']}" in done.stdout

"""``hydra/launcher=local`` for real, with processes: one job per GPU set of a declared pool (no GPU
needed: CPU jobs see the ids they were given), a queue rather than batches, a pool too small for the
jobs, and a SIGKILLed job in a real ``convnn-train`` sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convnn.runs.gpus import GpuPool, GpuPoolError, detected_gpus, gpu_pool, gpus_per_job
from convnn.runs.lock import lock_holder
from convnn.runs.records import read_record
from hydra_plugins.convnn_sweeper.local_launcher import default_local_parallelism
from tests.test_launch import sweep_command
from tests.test_slurm import EXPERIMENT, only

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

# A Hydra app whose job notes the GPUs it was given and when it ran. Job 0 stays until a job of the
# second four has started (as a GPU freed by one of jobs 1-3 lets it under a queue; batches of four
# would wait for job 0 first), so the overlap is made by the launcher, not by timing luck.
APP = """
import json, os, sys, time
from pathlib import Path
import hydra

@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg):
    out = Path(cfg.out)
    start = time.time()
    (out / f"start-{cfg.job}").write_text("")
    waited = True
    if cfg.job == 0:
        deadline = time.time() + 180
        while not any((out / f"start-{j}").exists() for j in range(4, 8)):
            if time.time() > deadline:
                waited = False
                break
            time.sleep(0.05)
    else:
        time.sleep(1.0)
    note = {"job": cfg.job, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "end": time.time(), "waited": waited}
    (out / f"job-{cfg.job}.json").write_text(json.dumps(note))

if __name__ == "__main__":
    main()
"""
APP_CONFIG = """
defaults:
  - override hydra/launcher: local
  - _self_
job: 0
out: {out}
trainer: {{accelerator: cpu, devices: 1}}
hydra:
  searchpath: [file://{configs}]
  sweep: {{dir: {sweep}, subdir: "${{hydra.job.num}}"}}
"""


def _app(tmp_path: Path) -> tuple[Path, Path]:
    """The app in ``tmp_path/app`` and the folder its jobs write their notes to."""
    app, out = tmp_path / "app", tmp_path / "notes"
    app.mkdir()
    out.mkdir()
    (app / "app.py").write_text(APP)
    (app / "app.yaml").write_text(APP_CONFIG.format(out=out, configs=CONFIGS, sweep=tmp_path / "sweep"))
    return app, out


def _run_app(app: Path, *overrides: str, env: dict[str, str] = JOB_ENV) -> subprocess.CompletedProcess:
    command = [sys.executable, str(app / "app.py"), "-m", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_cpu_jobs_side_by_side_share_the_cores_unless_omp_num_threads_is_set(tmp_path: Path) -> None:
    app, out = _app(tmp_path)
    unset = {k: v for k, v in JOB_ENV.items() if k != "OMP_NUM_THREADS"}
    result = _run_app(app, "job=5,6", env=unset)
    assert result.returncode == 0, result.stderr[-3000:]
    share = str(max(1, len(os.sched_getaffinity(0)) // default_local_parallelism(1)))
    assert [json.loads((out / f"job-{j}.json").read_text())["threads"] for j in (5, 6)] == [share] * 2
    result = _run_app(app, "job=7", env={**unset, "OMP_NUM_THREADS": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "job-7.json").read_text())["threads"] == "3"


def test_a_cpu_ddp_job_counts_one_process_per_device(tmp_path: Path) -> None:
    """``trainer.devices=2`` on the CPU: each job's two processes share its cores, so the sweep runs
    fewer jobs at once and gives each process fewer threads than for one-process jobs."""
    app, out = _app(tmp_path)
    unset = {k: v for k, v in JOB_ENV.items() if k != "OMP_NUM_THREADS"}
    result = _run_app(app, "job=5,6", "trainer.devices=2", env=unset)
    assert result.returncode == 0, result.stderr[-3000:]
    slots = default_local_parallelism(2)
    tasks = ", 2 processes each"
    assert f"hydra/launcher=local: {slots} jobs at a time (CPU jobs{tasks})" in result.stdout + result.stderr
    share = str(max(1, len(os.sched_getaffinity(0)) // slots // 2))
    assert [json.loads((out / f"job-{j}.json").read_text())["threads"] for j in (5, 6)] == [share] * 2


def test_a_pool_of_four_runs_eight_jobs_four_at_a_time_never_sharing_a_gpu(tmp_path: Path) -> None:
    app, out = _app(tmp_path)
    result = _run_app(
        app, "job=range(8)", "hydra.launcher.gpus_per_node=1", "hydra.launcher.visible_gpus=[0,1,2,3]"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hydra/launcher=local: 4 jobs at a time, 1 GPU each of ['0', '1', '2', '3']" in result.stdout
    notes = [json.loads((out / f"job-{j}.json").read_text()) for j in range(8)]
    assert sorted({n["gpus"] for n in notes}) == ["0", "1", "2", "3"]  # one id each, all used
    for note in notes:  # the jobs running when this one started (itself included)
        running = [n for n in notes if n["start"] <= note["start"] < n["end"]]
        assert len(running) <= 4, running
        for other in notes:
            if other is not note and other["gpus"] == note["gpus"]:
                assert other["end"] <= note["start"] or note["end"] <= other["start"], (note, other)
    first = notes[0]
    assert first["waited"], "no job of the second four started while job 0 ran: batches, not a queue"
    assert any(n["start"] < first["end"] for n in notes[4:])


def test_a_job_asking_more_gpus_than_the_pool_holds_stops_the_sweep_at_once(tmp_path: Path) -> None:
    app, out = _app(tmp_path)
    result = _run_app(app, "job=0,1", "hydra.launcher.gpus_per_node=2", "hydra.launcher.visible_gpus=[3]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "convnn-train: error: hydra/launcher=local: each job asks 2 GPUs (trainer.devices / "
        "hydra.launcher.gpus_per_node) but hydra.launcher.visible_gpus declares 1: ['3']; declare the GPUs "
        "with hydra.launcher.visible_gpus=[0,1,...] or train on the CPU with trainer=cpu"
    ]
    assert not list(out.iterdir())  # no job ran


def test_pool_detection_sizes_and_hand_out() -> None:
    assert detected_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, count=8) == ["2", "3"]  # what a scheduler gave us
    assert detected_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}) == ["GPU-a1", "GPU-b2"]
    assert detected_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=8) == []
    assert detected_gpus({}, count=3) == ["0", "1", "2"]
    assert (gpus_per_job("gpu", 2), gpus_per_job("cpu", 2)) == (2, 0)
    assert (gpus_per_job("auto", 1, detected=4), gpus_per_job("auto", 1, detected=0)) == (1, 0)
    assert gpu_pool(None, 2, detected=["0", "1", "2", "3", "4"]) == ["0", "1", "2", "3", "4"]
    assert gpu_pool([0, 1], 0) == []  # CPU jobs hold no GPU
    with pytest.raises(GpuPoolError, match=r"names \['1'\] more than once"):
        gpu_pool([0, 1, 1], 1)
    with pytest.raises(GpuPoolError, match="this machine shows no GPU; declare"):
        gpu_pool(None, 1, detected=[])
    pool = GpuPool(["0", "1", "2"])
    a, b = pool.take(2), pool.take(2)
    assert (a, b, pool.take(1)) == (["0", "1"], None, ["2"])
    pool.give(a)
    assert pool.take(2) == ["0", "1"]


def _sweep_until_a_job_runs(tmp_path: Path, sweeper: str, job: str) -> tuple[subprocess.Popen, Path, dict]:
    """A real local sweep (one job at a time, its own process group) of the tiny VGG with ``sweeper``,
    once job ``job`` (a glob of its run directory's name, as for :func:`tests.test_slurm.only`) holds its
    run's lock: the process, runs folder, holder."""
    search = tmp_path / "configs"
    (search / "experiment").mkdir(parents=True)
    (search / "experiment" / "tiny.yaml").write_text(
        EXPERIMENT.format(train_size=64, epochs=1, sweeper=sweeper)
    )
    out = tmp_path / "runs"
    command = sweep_command(search, out, "hydra/launcher=local", "hydra.sweeper.local_parallelism=1")
    sweep = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=JOB_ENV,
        start_new_session=True,
    )
    deadline, holder = time.monotonic() + 300, None
    while holder is None and time.monotonic() < deadline and sweep.poll() is None:
        found = list((out / "tiny").glob(job)) if (out / "tiny").is_dir() else []
        holder = lock_holder(found[0]) if found else None  # the job's own process holds its run's lock
        time.sleep(0.1)
    assert holder is not None, f"job {job} never started"
    return sweep, out, holder


def test_a_sigkilled_job_fails_alone_and_the_sweep_goes_on_to_its_summary(tmp_path: Path) -> None:
    """As the OOM killer does: SIGKILL one job's process. The next job still launches (one at a time:
    only after the kill) and finishes, the sweep prints its summary naming the signal and the job's
    log, and exits 1."""
    sweeper = "{rows: {doomed: 'seed=0 epochs=1000', rest: seed=1}}"
    sweep, out, holder = _sweep_until_a_job_runs(tmp_path, sweeper, "*epochs=1000,*seed=0")
    os.kill(holder["pid"], signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=600)

    assert sweep.returncode == 1, stderr[-3000:]
    assert "projected cost: 2 jobs x 1/1000 epochs; no reference epoch time for 2 jobs" in stdout
    summary = stdout[stdout.index("sweep summary:") :].splitlines()
    assert summary[0] == "sweep summary: 1 finished, 0 skipped, 1 failed"
    [failed] = summary[1:]
    assert failed.startswith("failed    seed=0 epochs=1000 experiment=tiny out_dir=")
    assert ": local job " in failed
    assert "was killed by signal 9 (SIGKILL) (the OOM killer sends it when memory runs out); see " in failed
    log = Path(failed.rsplit("; see ", 1)[1])
    assert log.is_file() and log.name.endswith("_0_log.err")
    assert "Traceback" not in stderr and "UncompletedJobError" not in stdout + stderr
    record = read_record(only(out / "tiny" / "*,seed=1") / "results.json")
    assert record["status"] == "finished"
    launched = record["launcher"]  # the job as the record names it: which local job, GPUs, log
    assert (launched["scheduler"], launched["gpus"]) == ("local", "")  # a CPU job sees no GPU
    assert Path(launched["log"]).is_file() and launched["job_id"] in launched["log"]


@pytest.mark.slow
def test_ctrl_c_stops_the_queue_and_the_running_job_records_it(tmp_path: Path) -> None:
    """SIGINT to the sweep's process group, as Ctrl-C in its terminal: the running job records itself
    interrupted, no other job starts, the summary lists them as not launched, exit 130."""
    sweep, out, _ = _sweep_until_a_job_runs(
        tmp_path, "{params: {seed: '0,1,2'}, rows: {long: epochs=1000}}", "*epochs=1000,*seed=0"
    )
    record = only(out / "tiny" / "*,seed=0") / "results.json"
    while not (record.is_file() and read_record(record)["epochs"]):  # training: its handlers are set
        time.sleep(0.1)
    os.killpg(sweep.pid, signal.SIGINT)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 130, stdout[-3000:] + stderr[-3000:]
    summary = stdout[stdout.index("sweep summary:") :].splitlines()
    assert summary[0] == "sweep summary: 0 finished, 2 skipped, 1 failed"
    assert summary[1].endswith(": interrupted by SIGINT; continue it with resume=true")
    assert all(
        line.endswith(": not launched: the sweep was stopped; re-run it to continue") for line in summary[2:]
    )
    record = read_record(record)
    assert (record["status"], record["error"]) == ("interrupted", "interrupted by SIGINT")
    assert not list((out / "tiny").glob("*,seed=1"))

"""Launching sweeps: SLURM / local launcher configs, skip-finished and resume, a real submitit sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from convnn.runs.records import read_record, write_record
from convnn.runs.sweep import JobOutcome, expand_jobs, format_jobs, format_summary, run_state
from hydra_plugins.convnn_sweeper.local_launcher import default_local_parallelism

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TINY_EXPERIMENT = """# @package _global_
defaults:
  - override /data: synthetic
  - override /model: vgg11
  - override /layer: conv2d
model:
  width_mult: 0.0625
  hidden_features: 16
data:
  train_size: 64
  test_size: 32
epochs: 1
batch_size: 32
logger: {name: none}
trainer: {progress_bar: none}
hydra:
  sweeper:
    rows:
      small: layer.kernel_size=1
      large: layer.kernel_size=3 layer.bias=false
    params:
      seed: "0"
"""


def launcher(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_is_submitit_slurm_and_overridable() -> None:
    cfg = launcher(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"]
        + ["hydra.launcher.timeout_min=60", "hydra.launcher.array_parallelism=8", "hydra.launcher.mem_gb=32"]
    )
    assert cfg._target_ == "hydra_plugins.convnn_sweeper.slurm_launcher.SlurmLauncher"
    assert (cfg.partition, cfg.gpus_per_node, cfg.tasks_per_node) == ("gpu", 4, 1)  # one task per device
    assert (cfg.timeout_min, cfg.array_parallelism, cfg.mem_gb, cfg.cpus_per_task) == (60, 8, 32, 2)


def test_slurm_launcher_asks_for_what_the_trainer_uses() -> None:
    """CPU-only partitions: no GPU and one task (sbatch rejects ``--ntasks-per-node=0``); GPUs, tasks
    and nodes follow ``trainer``; memory is the cluster's default unless set."""
    cpu = launcher(["hydra/launcher=slurm"])
    assert (cpu.gpus_per_node, cpu.tasks_per_node, cpu.nodes, cpu.mem_gb) == (0, 1, 1, None)
    gpu = launcher(["hydra/launcher=slurm", "trainer=gpu"])
    assert (gpu.gpus_per_node, gpu.tasks_per_node) == (1, 1)
    ddp = launcher(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=3"])
    assert (ddp.gpus_per_node, ddp.tasks_per_node, ddp.nodes) == (2, 2, 3)
    cpu_ddp = launcher(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    )
    assert (cpu_ddp.gpus_per_node, cpu_ddp.tasks_per_node) == (0, 2)  # one srun task per rank, on CPUs too
    forced = launcher(["hydra/launcher=slurm", "trainer=gpu", "hydra.launcher.gpus_per_node=0"])
    assert (forced.gpus_per_node, forced.tasks_per_node) == (0, 1)


def test_a_requeued_slurm_job_resumes_its_run() -> None:
    """submitit's requeue (USR2) resubmits the job without ``overwrite`` / ``resume``: it continues."""
    from hydra_plugins.convnn_sweeper.slurm_launcher import SlurmLauncher

    job = ["layer=conv2d", "overwrite=true", "+resume=false", "seed=1"]
    again = SlurmLauncher().checkpoint(job, "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert again.args == (["layer=conv2d", "seed=1"], "hydra.sweep.dir", 3, "job_id_for_3", {})


def test_local_launcher_gpus_per_job_follow_the_trainer() -> None:
    """No GPU on this machine: the default ``trainer=auto`` jobs are CPU jobs; ``trainer=gpu`` /
    ``ddp`` jobs hold ``trainer.devices`` GPUs of the pool."""
    cfg = launcher(["hydra/launcher=local"])
    assert cfg._target_ == "hydra_plugins.convnn_sweeper.local_launcher.LocalLauncher"
    assert (cfg.gpus_per_node, cfg.visible_gpus, cfg.cpus_per_task) == (
        0 if not torch.cuda.device_count() else 1,
        None,
        1,
    )
    assert launcher(["hydra/launcher=local", "trainer=gpu"]).gpus_per_node == 1
    assert launcher(["hydra/launcher=local", "trainer=ddp", "trainer.devices=2"]).gpus_per_node == 2
    assert launcher(["hydra/launcher=local", "trainer=cpu"]).gpus_per_node == 0


def test_every_multirun_uses_the_paper_sweeper_by_default() -> None:
    """Any `-m` sweep (not only the paper's experiments) can dry-run and skip finished runs, and the
    submitit launchers work without an experiment (the sweeper sets HydraConfig before they resolve)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.convnn_sweeper.paper_sweeper.PaperSweeper"


def test_rows_are_a_union_and_params_a_product() -> None:
    jobs = expand_jobs({"a": "x=0 p=1", "b": "x=5,6 p=1,2"}, ["data=c10,c100", "seed=0"])
    assert len(jobs) == (1 + 4) * 2
    assert jobs[0] == ["x=0", "p=1", "data=c10", "seed=0"]
    assert ["x=6", "p=2", "data=c100", "seed=0"] in jobs
    assert expand_jobs(None, ["a=1,2", "b=3"]) == [["a=1", "b=3"], ["a=2", "b=3"]]


def test_params_replace_row_keys_and_duplicates_are_kept_once() -> None:
    jobs = expand_jobs({"a": "x=0 p=1", "b": "x=5,6 p=1,2"}, ["x=5"])
    assert jobs == [["p=1", "x=5"], ["p=2", "x=5"]]


CONFIG = {
    "model": {"name": "vgg11"},
    "layer": {"name": "conv2d"},
    "data": {"name": "cifar10"},
    "epochs": 2,
    "seed": 0,
}


def _record(run_dir: Path, status: str, epochs: int, resumable: bool = True, **config: object) -> None:
    rows = [{"epoch": e + 1, "test_acc1": 50.0} for e in range(epochs)]
    record = {"status": status, "epochs": rows, "resumable": resumable, "config": {**CONFIG, **config}}
    write_record(run_dir / "results.json", record)


def test_run_state_skips_only_finished_runs_of_the_same_identity(tmp_path: Path) -> None:
    assert run_state(tmp_path / "absent", CONFIG).name == "new"
    _record(tmp_path / "done", "finished", 2)
    _record(tmp_path / "died", "running", 1)
    _record(tmp_path / "failed", "failed", 2)
    _record(tmp_path / "nan", "diverged", 1, resumable=False)
    _record(tmp_path / "old", "finished", 2, data={"name": "cifar10", "subset": {"train": 1024}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text('{"status": "fini')
    assert run_state(tmp_path / "done", CONFIG).name == "finished"
    assert run_state(tmp_path / "done", {**CONFIG, "out_dir": "/x", "name": "e"}).name == "finished"
    stale = run_state(tmp_path / "done", {**CONFIG, "epochs": 3})  # asked for another budget now
    assert (stale.name, stale.reason) == ("stale", "its record differs in epochs")
    assert run_state(tmp_path / "done", {**CONFIG, "seed": 1}).name == "stale"
    assert run_state(tmp_path / "died", CONFIG).name == "unfinished"
    assert run_state(tmp_path / "failed", CONFIG).name == "unfinished"
    assert run_state(tmp_path / "nan", CONFIG).name == "blocked"
    assert run_state(tmp_path / "old", CONFIG).reason == "its record differs in data.subset"
    corrupt = run_state(tmp_path / "bad", CONFIG)
    assert corrupt.name == "corrupt" and str(tmp_path / "bad" / "results.json") in corrupt.reason


def test_local_launcher_parallelism_fits_the_machine() -> None:
    assert default_local_parallelism(1, cpus=2, mem_gib=24) == 2
    assert default_local_parallelism(1, cpus=16, mem_gib=24) == 6  # memory: one job per 4 GiB
    assert default_local_parallelism(8, cpus=16, mem_gib=256) == 2
    assert default_local_parallelism(4, cpus=2, mem_gib=2) == 1


def test_local_launcher_parallelism_counts_the_cores_the_process_may_use() -> None:
    """Pinned to one core (``taskset``), or given one CPU by SLURM, the launcher runs one job at a
    time, whatever ``os.cpu_count()`` says."""
    probe = (
        "from hydra_plugins.convnn_sweeper.local_launcher import default_local_parallelism as d;"
        "print(d(1, mem_gib=64))"
    )
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert pinned.stdout.strip() == "1"
    env = {**os.environ, "SLURM_CPUS_PER_TASK": "1"}
    slurm = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert slurm.stdout.strip() == "1"


def test_listings_and_summary_name_every_job_that_does_not_finish() -> None:
    outcomes = [
        JobOutcome(("a=2",), "skipped", "finished"),
        JobOutcome(("a=3",), "failed", "invalid config: layer.ratio=1.5"),
    ]
    assert format_jobs([["a=1"]], outcomes).splitlines() == [
        "1 jobs to launch, 1 skipped, 1 failed",
        "   0  a=1",
        "skipped   a=2: finished",
        "failed    a=3: invalid config: layer.ratio=1.5",
    ]
    assert format_summary([JobOutcome(("a=1",), "finished"), *outcomes]).splitlines() == [
        "sweep summary: 1 finished, 1 skipped, 1 failed",
        "skipped   a=2: finished",
        "failed    a=3: invalid config: layer.ratio=1.5",
    ]


def sweep_command(search: Path, out: Path, *extra: str, experiment: str = "tiny") -> list[str]:
    """``convnn-train -m`` over ``experiment`` (a YAML in ``search/experiment``) into ``out``."""
    return [
        "convnn-train",
        "-m",
        f"experiment={experiment}",
        f"hydra.searchpath=[file://{search}]",
        f"out_dir={out}",
        *extra,
    ]


def _sweep(search: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(search, out, *extra), capture_output=True, text=True, timeout=300)


def test_submitit_local_sweep_runs_for_real_then_skips_and_resumes(tmp_path: Path) -> None:
    search = tmp_path / "configs"
    (search / "experiment").mkdir(parents=True)
    (search / "experiment" / "tiny.yaml").write_text(TINY_EXPERIMENT)
    out = tmp_path / "runs"

    first = _sweep(search, out, "hydra/launcher=local", "hydra.sweeper.local_parallelism=1")
    assert first.returncode == 0, first.stderr[-3000:]
    records = sorted(out.rglob("results.json"))
    assert len(records) == 2
    assert len(list((out / "tiny" / ".submitit").glob("*/*_result.pkl"))) == 2  # ran through submitit
    spans = sorted((read_record(p)["started_at"], read_record(p)["finished_at"]) for p in records)
    assert spans[0][1] <= spans[1][0]  # local_parallelism=1: one job after the other
    for path in records:
        record = read_record(path)
        assert record["status"] == "finished"
        assert record["config"]["layer"]["kernel_size"] in (1, 3)
        assert len(record["epochs"]) == 1

    died = records[0]
    record = read_record(died)
    write_record(died, {**record, "status": "running"})
    again = _sweep(search, out, "hydra.sweeper.dry_run=true")
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.strip().splitlines()
    assert lines[0] == "1 jobs to launch, 1 skipped"
    assert ("layer.kernel_size=1" in lines[1]) == (record["config"]["layer"]["kernel_size"] == 1)
    assert lines[2].startswith("skipped") and lines[2].endswith(": finished")
    assert lines[3] == (  # synthetic data: no authors' epoch time applies
        "projected cost: 1 jobs x 1 epochs; no reference epoch time for 1 jobs: vgg11 / synthetic (1); "
        "peak GPU memory per job: not measured yet (make gpu-check)"
    )
    assert json.loads(died.read_text())["status"] == "running"  # a dry run changes nothing

    stale = records[1]
    record = read_record(stale)
    write_record(stale, {**record, "config": {**record["config"], "batch_size": 64}})
    lines = _sweep(search, out, "hydra.sweeper.dry_run=true").stdout.strip().splitlines()
    assert lines[0] == "1 jobs to launch, 1 failed"
    assert lines[2].startswith("failed") and lines[2].endswith("stale: its record differs in batch_size")


def test_unknown_sweeper_option_fails_before_running(tmp_path: Path) -> None:
    search = tmp_path / "configs"
    (search / "experiment").mkdir(parents=True)
    (search / "experiment" / "tiny.yaml").write_text(TINY_EXPERIMENT)
    result = _sweep(search, tmp_path / "runs", "hydra.sweeper.dry_run=true", "hydra.sweeper.bogus=1")
    assert result.returncode != 0
    assert "bogus" in result.stderr
    assert not (tmp_path / "runs").exists()

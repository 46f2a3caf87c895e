"""Sweeps on a real SLURM cluster (``scripts/slurm_cluster.sh start``; CI starts one): sbatch --array
through the project's launcher config, scancel, time-limit requeue, Lightning's hpc checkpoints, a
re-launch while jobs are queued, and the SLURM ids in the run record. Skipped when no cluster is up.

The time-limit sweep needs about two minutes of wall time (the USR2 comes 30 s before a 2-minute
limit), so it is submitted when the module starts and checked by its last test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from convnn.runs.records import read_record
from tests.test_launch import sweep_command

pytestmark = pytest.mark.slurm

EXPERIMENT = """# @package _global_
defaults:
  - override /data: synthetic
  - override /model: vgg11
  - override /layer: conv2d
model: {{width_mult: 0.0625, hidden_features: 16}}
data: {{train_size: {train_size}, test_size: 32}}
epochs: {epochs}
batch_size: 32
logger: {{name: none}}
trainer: {{progress_bar: none}}
hydra: {{sweeper: {sweeper}}}
"""
EXPERIMENTS = {
    "pair": EXPERIMENT.format(train_size=64, epochs=1, sweeper="{params: {seed: '0,1'}}"),
    # task 0 trains 12 epochs of about 2 s (cancelled mid-run), task 1 one short epoch
    "cancel": EXPERIMENT.format(
        train_size=64,
        epochs=1,
        sweeper="{rows: {long: 'seed=0 epochs=12 data.train_size=2048', quick: seed=1}}",
    ),
    # 1,000 epochs of about 0.7 s (idle machine): still training when the 2-minute limit comes, at any
    # speed this test meets (100 epochs, meant as about 4 minutes, once finished within it);
    # the test cancels it when done
    "timeout": EXPERIMENT.format(train_size=2048, epochs=1000, sweeper="{}"),
    "ddp": EXPERIMENT.format(train_size=64, epochs=2, sweeper="{}"),
}
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "hydra.launcher.cpus_per_task=1"]
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # tiny jobs share 2 CPUs
RESTORED = "Restoring states from the checkpoint path at"  # Lightning's line when it loads a checkpoint


def _cluster_up() -> str | None:
    """Why no test cluster can be used here, or ``None`` when one is up."""
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return "no SLURM client here (start a test cluster as root: scripts/slurm_cluster.sh start)"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed ({e}); start a test cluster as root: scripts/slurm_cluster.sh start"
    if nodes.returncode or not {"idle", "mixed", "allocated"} & set(nodes.stdout.split()):
        return f"no SLURM node is up (sinfo: {(nodes.stdout + nodes.stderr).strip()[:200]!r})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skips the module's tests, saying why, where no SLURM cluster is up."""
    reason = _cluster_up()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def search(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test experiments' config directory."""
    root = tmp_path_factory.mktemp("slurm")
    (root / "configs" / "experiment").mkdir(parents=True)
    for name, text in EXPERIMENTS.items():
        (root / "configs" / "experiment" / f"{name}.yaml").write_text(text)
    return root / "configs"


def command(search: Path, out: Path, experiment: str, *extra: str) -> list[str]:
    """A sweep of ``experiment`` on the cluster with the project's launcher config, named for cleanup."""
    return sweep_command(
        search,
        out,
        "hydra/launcher=slurm",
        f"hydra.launcher.name=convnn-test-{experiment}",
        "hydra.launcher.timeout_min=10",
        *extra,
        experiment=experiment,
    )


def sweep(search: Path, out: Path, experiment: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(search, out, experiment, *extra), capture_output=True, text=True, timeout=300, env=JOB_ENV
    )


def start(search: Path, out: Path, experiment: str, *extra: str) -> subprocess.Popen:
    """The sweep in the background (its output in ``out/<experiment>.log``)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{experiment}.log", "w")  # noqa: SIM115 - the child writes it until it ends
    return subprocess.Popen(
        command(search, out, experiment, *extra), stdout=log, stderr=subprocess.STDOUT, text=True, env=JOB_ENV
    )


@contextmanager
def running(search: Path, out: Path, experiment: str, *extra: str) -> Iterator[subprocess.Popen]:
    """The sweep in the background for the ``with`` block, then waited for (its jobs cancelled and
    the process ended if the block failed); its output is in ``out/<experiment>.log``."""
    process = start(search, out, experiment, *extra)
    try:
        yield process
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            cancel(experiment)
            process.terminate()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 240.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def only(pattern: Path) -> Path:
    """The one run directory matching ``pattern``, a glob in its last part (``root / "*,seed=0"``: run
    directories are named by run identity and seed, and these sweeps hold one run per seed)."""
    [found] = pattern.parent.glob(pattern.name)
    return found


def record_of(run_dir: Path) -> dict[str, Any] | None:
    """The record in ``run_dir`` (may be a pattern as for :func:`only`), or ``None`` before there is one."""
    paths = [p / "results.json" for p in run_dir.parent.glob(run_dir.name) if (p / "results.json").is_file()]
    return read_record(paths[0]) if paths else None


def record_where(run_dir: Path, check: Callable[[dict[str, Any]], bool]) -> Callable[[], Any]:
    """A poll for :func:`wait_for`: the run's record once ``check`` holds for it."""

    def poll() -> dict[str, Any] | None:
        record = record_of(run_dir)
        return record if record and check(record) else None

    return poll


def queue() -> dict[str, str]:
    """Every job SLURM holds, per array task: id -> state."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, check=True)
    return dict(line.split() for line in out.stdout.splitlines())


def sacct(job_id: str) -> tuple[str, str]:
    """``(state, node)`` of a job as the accounting database has it."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,NodeList"],
        capture_output=True,
        text=True,
        check=True,
    )
    state, node = out.stdout.strip().splitlines()[0].split("|")
    return state, node


def cancel(experiment: str) -> None:
    subprocess.run(["scancel", f"--name=convnn-test-{experiment}"], check=False)


class RecordWatcher(threading.Thread):
    """Keeps every distinct state (status, error, restart count, epochs) of a run's record, polled
    from a thread while the module's other tests run: the state between a requeue and the restart
    lasts seconds."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.seen, self.stop = run_dir, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            record = record_of(self.run_dir)
            if record and (not self.seen or _state(self.seen[-1]) != _state(record)):
                self.seen.append(record)

    def first(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return next((r for r in self.seen if check(r)), None)


def _state(record: dict[str, Any]) -> tuple:
    return record["status"], record["error"], record["launcher"].get("restart_count"), len(record["epochs"])


@pytest.fixture(scope="module")
def time_limited(
    search: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, Path, RecordWatcher]]:
    """The time-limit sweep, submitted first: a 2-minute limit, USR2 30 s before it, ``overwrite=true``
    (the requeued job drops it); its record is watched from then on."""
    out = tmp_path_factory.mktemp("timeout")
    process = start(
        search,
        out,
        "timeout",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=30",
        "hydra.launcher.max_num_timeout=3",
        "overwrite=true",  # the requeued job must resume all the same
    )
    watcher = RecordWatcher(out / "timeout" / "*,seed=0")
    watcher.start()
    yield process, out / "timeout" / "*,seed=0", watcher
    watcher.stop.set()
    cancel("timeout")
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def pair(search: Path, tmp_path_factory: pytest.TempPathFactory, time_limited: Any) -> tuple[Path, str]:
    """A 2-job array sweep run to the end: ``(run directories' parent, sweep output)``."""
    out = tmp_path_factory.mktemp("pair")
    result = sweep(search, out, "pair")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "pair", result.stdout + result.stderr


CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_cluster.sh"


@pytest.fixture
def cluster_state(cluster: None) -> Path:
    """The state folder of the cluster ``scripts/slurm_cluster.sh`` started (skips where it did not)."""
    state = Path(os.environ.get("CONVNN_SLURM_DIR", "/var/lib/convnn-slurm"))
    if not os.access(state, os.W_OK):
        pytest.skip("the cluster was not started by scripts/slurm_cluster.sh here")
    return state


def test_cluster_script_start_is_idempotent(cluster_state: Path) -> None:
    """``start`` on a running cluster returns at once; ``status`` lists every daemon's pid."""
    started = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0 and "already running" in started.stderr, started.stderr
    status = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    daemons = dict(line.split(": ") for line in status.stdout.splitlines() if ": " in line)
    assert set(daemons) == {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"}
    assert all(pid.isdigit() for pid in daemons.values())


def test_cluster_script_starts_a_killed_cluster_afresh(cluster_state: Path, tmp_path: Path) -> None:
    """Every daemon SIGKILLed while a job runs (a CI run ended mid-suite): ``start`` brings the node
    back idle, the dead cluster's job is dropped from the queue and its process ended."""
    marker = f"sleep {600 + os.getpid() % 1000}"  # names this test's job process alone
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--job-name=convnn-test-stale",
            f"--output={tmp_path}/%j.out",
            f"--wrap={marker}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_for(f"job {job} to run", lambda: queue().get(job) == "RUNNING", timeout=60)
    for daemon in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
        os.kill(int((cluster_state / "run" / f"{daemon}.pid").read_text()), signal.SIGKILL)
    started = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=150)
    assert started.returncode == 0, started.stderr
    assert "starting afresh" in started.stderr and "up: node" in started.stderr, started.stderr
    assert job not in queue()
    wait_for(
        "the dead cluster's job process to end",
        lambda: subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1,
        timeout=60,
    )


def test_array_sweep_records_jobs_and_a_rerun_skips_them(search: Path, pair: tuple[Path, str]) -> None:
    """Items 1, 2, 7: the default launcher config on a CPU-only node; both records finished, each with
    its SLURM job id, array index, node and submitit log, which sacct and the log files confirm."""
    root, _ = pair
    records = [read_record(only(root / f"*,seed={seed}")) for seed in (0, 1)]
    assert [r["status"] for r in records] == ["finished", "finished"]
    slurm = [r["launcher"] for r in records]
    array = slurm[0]["array_job_id"]
    assert {s["array_task_id"] for s in slurm} == {0, 1} and slurm[1]["array_job_id"] == array
    for info in slurm:
        assert info["job_id"] == f"{array}_{info['array_task_id']}"
        done = ("COMPLETED", info["node"])  # the job ends a moment after its result is written
        wait_for(
            f"sacct: {info['job_id']} {done}", lambda info=info, done=done: sacct(info["job_id"]) == done, 60
        )
        log = Path(info["log"])
        assert log == root / ".submitit" / info["job_id"] / f"{info['job_id']}_0_log.out"
        assert log.is_file() and log.with_suffix(".err").is_file()
        assert "SLURM auto-requeueing enabled" not in log.with_suffix(".err").read_text()  # submitit owns it
    script = (root / ".submitit" / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --ntasks-per-node=1" in script

    before = set(queue())
    again = sweep(search, root.parent, "pair")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep summary: 0 finished, 2 skipped, 0 failed" in again.stdout
    assert "sweep output dir" not in again.stdout + again.stderr  # nothing submitted
    assert set(queue()) <= before
    assert [read_record(only(root / f"*,seed={seed}"))["launcher"] for seed in (0, 1)] == slurm


def test_a_ddp_job_runs_one_srun_task_per_device_to_a_record_naming_both(
    search: Path, tmp_path: Path
) -> None:
    """``trainer.devices=2`` on CPUs (gloo): the job asks ``--ntasks-per-node=2``, ``srun`` starts both
    ranks (each its own SLURM task in Lightning's SLURM environment; rank 0 decides the start and
    tells the other), and the finished record names both tasks; a re-run skips the finished job."""
    result = sweep(search, tmp_path, "ddp", *DDP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep summary: 1 finished, 0 skipped, 0 failed" in result.stdout
    [path] = (tmp_path / "ddp").rglob("results.json")
    record = read_record(path)
    assert record["status"] == "finished" and [row["epoch"] for row in record["epochs"]] == [1, 2]
    ranks = record["distributed"].pop("ranks")
    assert [(r["rank"], r["slurm_task"], r["slurm_node"]) for r in ranks] == [
        (0, 0, record["launcher"]["node"]),
        (1, 1, record["launcher"]["node"]),
    ]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["batch_size_per_rank"] == 16
    assert record["final"]["test_images"] == 32
    job = record["launcher"]["job_id"]
    script = (tmp_path / "ddp" / ".submitit" / job / f"{job}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "\nsrun " in script
    assert sorted(p.name for p in path.parent.iterdir()) == [".hydra", "checkpoints", "results.json"]
    again = sweep(search, tmp_path, "ddp", *DDP)
    assert "sweep summary: 0 finished, 1 skipped, 0 failed" in again.stdout, again.stderr[-3000:]


@pytest.mark.parametrize(
    ("ask", "refusal"),
    [
        (
            f"hydra.launcher.cpus_per_task={(os.cpu_count() or 1) * 64}",
            "More processors requested than permitted",
        ),
        ("hydra.launcher.mem_gb=100000", "Memory specification can not be satisfied"),
    ],
)
def test_a_job_asking_more_than_the_node_has_fails_at_once(
    search: Path, tmp_path: Path, ask: str, refusal: str
) -> None:
    """Item 2: more CPUs or memory than the node has is refused by sbatch with its reason, not queued."""
    result = sweep(search, tmp_path, "pair", ask)
    assert result.returncode != 0
    assert "sbatch" in result.stderr and refusal in result.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_lightning_hpc_checkpoint_is_never_restored(search: Path, pair: tuple[Path, str]) -> None:
    """Item 5: an ``hpc_ckpt_*.ckpt`` (Lightning's auto-requeue file, which Lightning restores under
    SLURM whenever ``ckpt_path=None``) in a run directory started afresh (``overwrite=true``) is
    removed and not restored: the run trains its epoch instead of taking the file's marked history."""
    root, _ = pair
    run_dir = only(root / "*,seed=0")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    marked = 0
    for state in ckpt["callbacks"].values():
        if "history" in state:
            state["history"] = [{**row, "test_acc1": -1.0} for row in state["history"]]
            marked += 1
    assert marked == 1
    torch.save(ckpt, run_dir / "hpc_ckpt_7.ckpt")
    record = read_record(run_dir)

    result = sweep(search, root.parent, "pair", "overwrite=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep summary: 2 finished, 0 skipped, 0 failed" in result.stdout
    rerun = read_record(run_dir)
    assert rerun["status"] == "finished"
    assert rerun["launcher"]["job_id"] != record["launcher"]["job_id"]
    assert [row["epoch"] for row in rerun["epochs"]] == [1]
    assert rerun["epochs"][0]["test_acc1"] >= 0.0  # trained, not the hpc checkpoint's -1
    assert not list(run_dir.glob("hpc_ckpt_*"))
    log = Path(rerun["launcher"]["log"])
    assert "removed" in log.read_text() and "hpc_ckpt_7.ckpt" in log.read_text()
    assert RESTORED not in log.with_suffix(".err").read_text()


def test_cancelled_job_is_reported_resumed_and_never_launched_twice(search: Path, tmp_path: Path) -> None:
    """Items 3 and 6: while task 0 runs and task 1 waits (array_parallelism=1), a re-launch submits
    nothing; scancel of task 0 mid-run fails the sweep with the job's state, not a hang; a re-run
    resumes task 0 from its checkpoint (its first epochs kept exactly) and skips the finished task 1."""
    long_dir = tmp_path / "cancel" / "*,seed=0"  # a pattern until the run exists (see only)
    quick_dir = tmp_path / "cancel" / "*,seed=1"
    with running(search, tmp_path, "cancel", "hydra.launcher.array_parallelism=1") as process:
        first = wait_for("task 0's first epoch", record_where(long_dir, lambda r: len(r["epochs"]) >= 1))
        job, array = first["launcher"]["job_id"], first["launcher"]["array_job_id"]
        assert queue().get(f"{array}_1") == "PENDING"

        before = set(queue())
        relaunched = sweep(search, tmp_path, "cancel")
        assert relaunched.returncode == 0, relaunched.stderr[-3000:]
        lines = relaunched.stdout.splitlines()
        assert lines.pop(0) == "projected cost: no jobs to launch"
        assert lines[0] == "sweep summary: 0 finished, 2 skipped, 0 failed"
        assert sorted(line.rsplit(" ", 1)[1] for line in lines[1:]) == [f"{array}_0", f"{array}_1"]
        assert all(": queued or running: SLURM job" in line for line in lines[1:])
        assert set(queue()) <= before  # no second copy submitted
        assert not record_where(long_dir, lambda r: r["status"] != "running")()  # still mid-run

        subprocess.run(["scancel", job], check=True)
    output = (tmp_path / "cancel.log").read_text()
    assert process.returncode == 143, output[-3000:]  # a job stopped by SIGTERM stops the sweep
    assert "sweep summary: 1 finished, 0 skipped, 1 failed" in output
    assert "failed    seed=0 epochs=12 data.train_size=2048 experiment=cancel" in output
    assert ": interrupted by SIGTERM; continue it with resume=true" in output
    cancelled = read_record(only(long_dir))
    assert (cancelled["status"], cancelled["error"]) == ("interrupted", "interrupted by SIGTERM")
    kept = cancelled["epochs"]
    assert 1 <= len(kept) < 12
    assert read_record(only(quick_dir))["status"] == "finished"

    result = sweep(search, tmp_path, "cancel")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep summary: 1 finished, 1 skipped, 0 failed" in result.stdout
    resumed = read_record(only(long_dir))
    assert resumed["status"] == "finished"
    assert [row["epoch"] for row in resumed["epochs"]] == list(range(1, 13))
    assert resumed["epochs"][: len(kept)] == kept  # restored from the checkpoint, not retrained
    err = Path(resumed["launcher"]["log"]).with_suffix(".err").read_text()
    assert RESTORED in err and str(only(long_dir) / "checkpoints" / "last.ckpt") in err


def test_a_job_that_dies_without_a_result_is_reported(search: Path, tmp_path: Path) -> None:
    """A job cancelled before it ever ran (held, then scancel) leaves no result and no sacct entry:
    the sweep does not wait for it forever, runs the other job and lists the dead one with its log."""
    with running(search, tmp_path, "pair", "+hydra.launcher.additional_parameters.hold=true") as process:

        def held_array() -> list[str]:
            assert process.poll() is None, (tmp_path / "pair.log").read_text()[-3000:]
            return [job for job, state in queue().items() if job.endswith("_0") and state == "PENDING"]

        array = wait_for("the held array", held_array, timeout=60)[0].split("_")[0]
        subprocess.run(["scancel", f"{array}_0"], check=True)
        subprocess.run(["scontrol", "release", array], check=True)
    output = (tmp_path / "pair.log").read_text()
    assert process.returncode == 1, output[-3000:]
    assert "sweep summary: 1 finished, 0 skipped, 1 failed" in output
    assert f"SlurmJobError: SLURM job {array}_0 left the queue without a result" in output
    assert read_record(only(tmp_path / "pair" / "*,seed=1"))["status"] == "finished"
    assert not list((tmp_path / "pair").glob("*,seed=0"))


def test_time_limit_requeues_and_resumes_from_the_last_checkpoint(time_limited: Any) -> None:
    """Item 4: at the time limit (USR2 ``signal_delay_s`` before it) submitit requeues the job, which
    resumes from ``last.ckpt``: same job id, restart count 1, epochs kept exactly and continued."""
    process, run_dir, watcher = time_limited

    def resumed_after_requeue() -> dict[str, Any] | None:
        assert process.poll() is None, (run_dir.parent.parent / "timeout.log").read_text()[-3000:]
        requeued = watcher.first(lambda r: (r["error"] or "").startswith("interrupted by SIGUSR2"))
        if requeued is None:
            return None
        return watcher.first(
            lambda r: r["launcher"]["restart_count"] == 1 and len(r["epochs"]) > len(requeued["epochs"])
        )

    resumed = wait_for("an epoch after the USR2 requeue", resumed_after_requeue, timeout=300)
    requeued = watcher.first(lambda r: (r["error"] or "").startswith("interrupted by SIGUSR2"))
    kept = requeued["epochs"]
    assert kept and requeued["status"] == "interrupted" and requeued["launcher"]["restart_count"] == 0
    assert resumed["status"] == "running" and resumed["launcher"]["job_id"] == requeued["launcher"]["job_id"]
    assert resumed["epochs"][: len(kept)] == kept
    assert [row["epoch"] for row in resumed["epochs"]] == list(range(1, len(resumed["epochs"]) + 1))
    err = Path(resumed["launcher"]["log"]).with_suffix(".err").read_text()
    assert "this job is timed-out" in err and RESTORED in err

"""Runs that never lose or mix results: re-runs, the lock, corrupt files, a full disk, divergence and
signals, each with a real fault (README "Runs, resume and recovery")."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from convnn.paths import CONFIG_DIR
from convnn.runs.checkpoints import AtomicCheckpointIO, CheckpointError, checkpoint_epochs
from convnn.runs.errors import EXIT_BUSY
from convnn.runs.records import read_record
from convnn.train import app as train
from convnn.train.module import ImageClassifier
from tests.faults import fill, small_fs
from tests.test_runlock import hold_lock
from tests.test_train import QUIET, TINY_DATA, TINY_VGG, convnn_train

TINY = [*TINY_DATA, *TINY_VGG, "layer=conv2d", *QUIET]


def run_dir_of(out: Path, *overrides: str) -> Path:
    """The run directory ``convnn-train out_dir=<out> <overrides>`` uses (composed as it composes)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"out_dir={out}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return Path(str(cfg.hydra.run.dir))


def fails(out: Path, *overrides: str, monkeypatch, capsys) -> tuple[int, str]:
    """Run ``convnn-train`` expecting it to stop; its exit code and its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convnn_train(out, *overrides, monkeypatch=monkeypatch)
    return e.value.code, capsys.readouterr().err


def test_rerunning_a_finished_run_keeps_it_and_exits_0(tmp_path, monkeypatch, capsys):
    run_dir = convnn_train(tmp_path, *TINY, "epochs=1", monkeypatch=monkeypatch)
    before = (run_dir / "results.json").read_text()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()
    convnn_train(tmp_path, *TINY, "epochs=1", monkeypatch=monkeypatch)  # returns: exit 0
    assert f"{run_dir} already finished; nothing to do" in capsys.readouterr().out
    # a bad override that is not part of the directory name changes nothing either
    convnn_train(tmp_path, *TINY, "epochs=1", "data.root=/nonexistent", monkeypatch=monkeypatch)
    assert (run_dir / "results.json").read_text() == before and ckpt.is_file()
    convnn_train(tmp_path, *TINY, "epochs=1", "overwrite=true", monkeypatch=monkeypatch)
    assert read_record(run_dir)["started_at"] >= json.loads(before)["started_at"]
    assert "overwrite=true: starting" in capsys.readouterr().out


def test_a_second_process_on_a_run_dir_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    run_dir = run_dir_of(tmp_path, *TINY, "epochs=1")
    holder = hold_lock(run_dir)
    try:
        code, err = fails(tmp_path, *TINY, "epochs=1", monkeypatch=monkeypatch, capsys=capsys)
        assert code == EXIT_BUSY and f"is in use by pid {holder.pid} on " in err
        assert err.count("\n") == 1 and not (run_dir / "results.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    convnn_train(tmp_path, *TINY, "epochs=1", monkeypatch=monkeypatch)  # the stale lock is taken over
    assert f"took over the stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert read_record(run_dir)["status"] == "finished" and not (run_dir / "run.lock").exists()


def test_a_sweep_skips_a_job_another_process_holds(tmp_path, monkeypatch, capsys):
    held = run_dir_of(tmp_path, *TINY, "epochs=1", "seed=1")
    holder = hold_lock(held)
    try:
        monkeypatch.setattr(
            sys, "argv", ["convnn-train", "-m", f"out_dir={tmp_path}", *TINY, "epochs=1", "seed=0,1"]
        )
        train.main()
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out
    assert "sweep summary: 1 finished, 1 skipped, 0 failed" in out
    assert f"in use by pid {holder.pid}" in out and not (held / "results.json").exists()


def test_a_job_another_process_takes_after_planning_is_skipped_not_failed(tmp_path, monkeypatch, capsys):
    from hydra_plugins.convnn_sweeper.paper_sweeper import PaperSweeper

    held = run_dir_of(tmp_path, *TINY, "epochs=1", "seed=1")
    holders = []
    plan = PaperSweeper.plan

    def plan_then_hold(self, *args, **kwargs):  # a second sweep takes seed=1 once this one has planned
        jobs = plan(self, *args, **kwargs)
        holders.append(hold_lock(held))
        return jobs

    monkeypatch.setattr(PaperSweeper, "plan", plan_then_hold)
    monkeypatch.setattr(
        sys, "argv", ["convnn-train", "-m", f"out_dir={tmp_path}", *TINY, "epochs=1", "seed=0,1"]
    )
    try:
        train.main()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    out = capsys.readouterr().out
    assert "sweep summary: 1 finished, 1 skipped, 0 failed" in out
    assert f"in use by pid {holders[0].pid}" in out and not (held / "results.json").exists()


def test_a_sweep_runs_every_valid_job_and_summarises_the_failures(tmp_path, monkeypatch, capsys):
    args = ["-m", f"out_dir={tmp_path}", *TINY, "epochs=1", "layer=branching", "layer.ratio=0.5,1.5,0.25"]
    monkeypatch.setattr(sys, "argv", ["convnn-train", *args, "hydra.sweeper.dry_run=true"])
    train.main()
    out = capsys.readouterr().out
    assert out.startswith("2 jobs to launch, 1 failed") and "ratio must lie in [0, 1], got 1.5" in out
    monkeypatch.setattr(sys, "argv", ["convnn-train", *args])
    with pytest.raises(SystemExit) as e:
        train.main()
    out = capsys.readouterr().out
    assert e.value.code == 1 and "sweep summary: 2 finished, 0 skipped, 1 failed" in out
    assert "layer.ratio=1.5: invalid config: model=vgg11 layer=branching: branching ratio" in out
    assert sorted(read_record(p)["config"]["layer"]["ratio"] for p in tmp_path.rglob("results.json")) == [
        0.25,
        0.5,
    ]


def test_a_truncated_checkpoint_stops_resume_in_one_line_and_keeps_the_history(tmp_path, monkeypatch, capsys):
    run_dir = convnn_train(tmp_path, *TINY, "epochs=2", monkeypatch=monkeypatch)
    record = read_record(run_dir)
    (run_dir / "results.json").write_text(json.dumps({**record, "status": "running"}))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # what a full disk leaves
    code, err = fails(tmp_path, *TINY, "epochs=2", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and f"checkpoint {ckpt} is unreadable" in err
    assert "overwrite=true starts the run afresh" in err
    after = read_record(run_dir)
    assert after["epochs"] == record["epochs"] and (after["status"], after["resumable"]) == ("failed", False)
    monkeypatch.setattr(sys, "argv", ["convnn-train", "-m", f"out_dir={tmp_path}", *TINY, "epochs=2"])
    with pytest.raises(SystemExit) as e:  # the sweeper reports it instead of relaunching it
        train.main()
    out = capsys.readouterr().out
    assert e.value.code == 1 and "0 finished, 0 skipped, 1 failed" in out and "unreadable" in out


def test_checkpoint_check_names_corrupt_bytes_not_only_truncation(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 4, "w": torch.arange(4096.0)}, path)
    assert checkpoint_epochs(path) == 5
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|unreadable"):
        checkpoint_epochs(path)


def test_a_checkpoint_save_onto_a_full_disk_keeps_the_old_one(tmp_path):
    with small_fs(tmp_path / "fs", 256) as fs:
        path = fs / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.zeros(1024)}, path)
        fill(fs, 16 * 1024)
        with pytest.raises(OSError) as e:
            AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(64 * 1024)}, path)
        assert e.value.errno == 28
        assert checkpoint_epochs(path) == 1 and sorted(os.listdir(fs)) == [".filler", "last.ckpt"]


def test_a_full_disk_during_training_leaves_a_failed_record_not_a_running_one(tmp_path, monkeypatch, capsys):
    with small_fs(tmp_path / "fs", 1024) as fs:  # room for the record, not for a 3 MB checkpoint
        code, err = fails(fs, *TINY, "epochs=1", monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and "No space left on device" in err.splitlines()[-1]
        record = read_record(next(fs.rglob("results.json")))
        assert record["status"] == "failed" and "No space left on device" in record["error"]
        assert not list(fs.rglob("*.tmp"))


def test_a_huge_learning_rate_diverges_and_is_recorded_as_such(tmp_path, monkeypatch, capsys):
    code, err = fails(
        tmp_path,
        *TINY,
        "epochs=3",
        "optim.lr=1e6",
        "optim.grad_clip=null",
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 1 and err.splitlines()[-1].startswith(
        "convnn-train: error: diverged: non-finite loss in epoch 1"
    )
    path = next(tmp_path.rglob("results.json"))
    text = path.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the record"))
    assert (record["status"], record["diverged_at_epoch"], len(record["epochs"])) == ("diverged", 1, 1)
    assert record["epochs"][0]["test_loss"] is None and "NaN" not in text


def _train_process(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "convnn.train.app", f"out_dir={out}", *overrides]
    # SIGINT at its default in the run, even where this runner inherited it ignored (a shell's background job)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_records_interrupted_and_exits_128_plus_it(tmp_path, sig, code):
    overrides = [*TINY, "data.train_size=256", "epochs=50"]
    proc = _train_process(tmp_path, *overrides)
    deadline = time.monotonic() + 300
    path = run_dir_of(tmp_path, *overrides) / "results.json"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and read_record(path)["epochs"]:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    record = read_record(path)
    assert proc.returncode == code, err[-2000:]
    assert f"interrupted by {sig.name}; continue it with resume=true" in err
    assert (record["status"], record["error"]) == ("interrupted", f"interrupted by {sig.name}")
    assert "Traceback" not in err and not (path.parent / "run.lock").exists()
    for harmless in ("srun", "LeafSpec", "litlogger"):  # filtered once, in convnn.train.quiet
        assert harmless not in err + out, harmless


SIGINT_IN_SECOND_CHECKPOINT = """
import os, signal, sys
from convnn.runs import checkpoints
from convnn.train import app
real, written = checkpoints.atomic_write, []

def write_then_sigint(path, write, binary=False):
    def then_sigint(f):
        write(f)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, before the temp file is renamed

    real(path, then_sigint if written else write, binary)
    written.append(path)

checkpoints.atomic_write = write_then_sigint
sys.argv = ["convnn-train", *sys.argv[1:]]
app.main()
"""


def test_a_signal_while_a_checkpoint_is_written_keeps_the_record_at_the_checkpoint(tmp_path, monkeypatch):
    """SIGINT after epoch 2's record row, while its checkpoint is being written: the old checkpoint
    (1 epoch) stays, the interrupted record lists that epoch only, and the resume trains epoch 2 once,
    so the record never holds an epoch that was trained twice."""
    overrides = [*TINY, "epochs=3"]
    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_IN_SECOND_CHECKPOINT, f"out_dir={tmp_path}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    run_dir = run_dir_of(tmp_path, *overrides)
    record, ckpts = read_record(run_dir), run_dir / "checkpoints"
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "epoch 2/3" in proc.stdout and record["status"] == "interrupted"
    assert (
        [r["epoch"] for r in record["epochs"]]
        == [1]
        == list(range(1, checkpoint_epochs(ckpts / "last.ckpt") + 1))
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    convnn_train(tmp_path, *overrides, "resume=true", monkeypatch=monkeypatch)
    resumed = read_record(run_dir)
    assert resumed["status"] == "finished" and [r["epoch"] for r in resumed["epochs"]] == [1, 2, 3]
    assert resumed["epochs"][0] == record["epochs"][0]


def test_resume_keeps_csv_rows_and_says_where_it_continues(tmp_path, monkeypatch, capsys):
    overrides = [*TINY_DATA, *TINY_VGG, "layer=conv2d", "trainer.progress_bar=none", "epochs=3"]
    run_dir = convnn_train(tmp_path, *overrides, monkeypatch=monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert f"convnn-train: run directory {run_dir}" in lines
    csv_rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    assert [float(r.split(",")[header.index("epoch")]) for r in csv_rows[1:]] == [1.0, 2.0, 3.0]
    real_step = ImageClassifier.training_step

    def dies_in_epoch_three(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "training_step", dies_in_epoch_three)
    with pytest.raises(SystemExit):
        convnn_train(tmp_path, *overrides, "overwrite=true", monkeypatch=monkeypatch)
    monkeypatch.setattr(ImageClassifier, "training_step", real_step)
    assert read_record(run_dir)["status"] == "failed"
    capsys.readouterr()
    convnn_train(tmp_path, *overrides, monkeypatch=monkeypatch)
    assert f"resuming {run_dir} from epoch 3 of 3" in capsys.readouterr().out
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [float(r.split(",")[header.index("epoch")]) for r in rows[1:]] == [1.0, 2.0, 3.0]
    assert [e["epoch"] for e in read_record(run_dir)["epochs"]] == [1, 2, 3]


def test_resume_true_with_nothing_to_resume_says_so(tmp_path, monkeypatch, capsys):
    convnn_train(tmp_path, *TINY, "epochs=1", "resume=true", monkeypatch=monkeypatch)
    assert "nothing to resume in " in capsys.readouterr().out


def test_the_progress_bar_numbers_epochs_from_1(tmp_path, monkeypatch, capsys):
    overrides = [
        *TINY_DATA,
        *TINY_VGG,
        "layer=conv2d",
        "logger=none",
        "trainer.progress_bar=tqdm",
        "epochs=2",
    ]
    convnn_train(tmp_path, *overrides, monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    bars = captured.err + captured.out
    assert "Epoch 1/2" in bars and "Epoch 2/2" in bars and "Epoch 2/1" not in bars


def test_a_corrupt_record_is_named_and_kept(tmp_path, monkeypatch, capsys):
    run_dir = run_dir_of(tmp_path, *TINY, "epochs=1")
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text('{"status": "fini')
    code, err = fails(tmp_path, *TINY, "epochs=1", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and f"{run_dir / 'results.json'} is not a valid run record" in err.splitlines()[-1]
    assert (run_dir / "results.json").read_text() == '{"status": "fini'
    convnn_train(tmp_path, *TINY, "epochs=1", "overwrite=true", monkeypatch=monkeypatch)
    assert read_record(run_dir)["status"] == "finished"


def test_a_closed_output_pipe_does_not_end_the_training(tmp_path):
    """``convnn-train ... 2>&1 | head -n 1``: head exits after the first line, so every later write
    (epoch lines on stdout, warnings on stderr, the summary) meets a closed pipe; the run trains on,
    its record says finished and it exits 0."""
    overrides = [*TINY, "epochs=2"]
    command = " ".join([sys.executable, "-m", "convnn.train.app", f"out_dir={tmp_path}", *overrides])
    done = subprocess.run(
        ["bash", "-c", f"{command} 2>&1 | head -n 1; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.stdout.startswith("convnn-train: run directory ") and done.stdout.count("\n") == 1
    assert done.returncode == 0
    record = read_record(run_dir_of(tmp_path, *overrides))
    assert (record["status"], len(record["epochs"]), record["error"]) == ("finished", 2, None)

"""The run-directory lock, with real processes: a live holder refuses others, a SIGKILLed one's lock
is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from convnn.runs.lock import LOCK_NAME, RunLock, RunLockedError, lock_holder

HOLD = (
    "import sys, time; from convnn.runs.lock import RunLock\n"
    "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
)


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """A separate process holding ``run_dir``'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder(tmp_path):
    proc = hold_lock(tmp_path / "run")
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_process_is_refused_with_the_holders_pid_and_host(tmp_path, holder):
    with pytest.raises(RunLockedError) as e, RunLock(tmp_path / "run"):
        pass
    message = str(e.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message and "\n" not in message
    assert lock_holder(tmp_path / "run")["pid"] == holder.pid
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid


def test_the_lock_of_a_sigkilled_process_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).is_file()  # the stale lock file stays behind
    assert lock_holder(tmp_path / "run") is None
    with RunLock(tmp_path / "run") as lock:
        assert lock.previous["pid"] == holder.pid
        assert lock_holder(tmp_path / "run")["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # a clean release removes the file


def test_release_lets_the_next_holder_in_and_nobody_holds_a_fresh_dir(tmp_path):
    assert lock_holder(tmp_path / "absent") is None
    with RunLock(tmp_path / "r") as first:
        assert first.previous is None
    with RunLock(tmp_path / "r"), pytest.raises(RunLockedError), RunLock(tmp_path / "r"):
        pass  # refused also within one process


def test_many_processes_racing_for_one_dir_admit_exactly_one(tmp_path):
    script = (
        "import sys, time; from convnn.runs.lock import RunLock, RunLockedError\n"
        "try:\n    with RunLock(sys.argv[1]):\n        time.sleep(1.0); print('won')\n"
        "except RunLockedError:\n    print('refused')\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["refused", "refused", "refused", "won"]

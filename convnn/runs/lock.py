"""Exclusive hold of a run directory: ``<run dir>/run.lock`` holding the owner's pid and host.

    with RunLock(run_dir):        # RunLockedError (one line naming pid and host) if someone holds it
        train()

The lock is a ``flock`` on the file, so the kernel releases it when its process dies however it dies
(SIGKILL, OOM, a node reboot on a shared filesystem with lock support): the file a killed process
leaves behind is a stale lock, and the next process takes it over. The file is removed on a clean
release. :func:`lock_holder` tells who holds a directory without taking it (the sweeper's check).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory; ``str(error)`` names it (pid, host, since)."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['since']}" if holder.get("since") else ""
        super().__init__(
            f"{path.parent} is in use by {who}{since} (lock {path}); wait for it or stop it first"
        )


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """Context manager holding ``<run_dir>/run.lock`` exclusively (see the module docstring).

    ``previous`` is set to the stale holder (``{"pid", "host", "since"}``) when a dead process's
    lock was taken over, else ``None``.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    def _open_locked(self) -> int:
        """An fd of the lock file holding its ``flock``; retried when the file was replaced meanwhile."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(self.path, holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder released and removed it between our open and flock: retry

    def __enter__(self) -> RunLock:
        if self._fd is not None:  # held already (e.g. after :meth:`move`): entering again keeps it
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open_locked()
        old = _read_holder(fd)
        self.previous = old or None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def move(self, run_dir: str | Path) -> None:
        """Rename the held run directory to ``run_dir`` (which must be missing or empty), keeping the
        lock: the lock file moves with its directory. ``OSError`` when ``run_dir`` is not empty."""
        os.rename(self.path.parent, run_dir)
        self.path = Path(run_dir) / LOCK_NAME

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir`` right now (``{"pid", "host", "since"}``), or ``None`` when nobody does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)
    return None

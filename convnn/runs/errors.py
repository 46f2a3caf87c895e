"""How a run stops: :class:`RunError` (one line and an exit code) and the exit codes of
``convnn-train``; :func:`unwritable`, the check that runs can be written under a folder."""

from __future__ import annotations

import os
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 75, 130, 143


class RunError(Exception):
    """A run that stops with a one-line message and an exit code (``EXIT_*``).

    A single run prints the message and exits with ``code``; in a sweep the job fails with it and
    the sweeper lists it in its summary. Picklable (submitit sends it back from the job process).
    """

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(" ".join(message.split()), code)

    def __str__(self) -> str:
        return self.args[0]

    @property
    def code(self) -> int:
        return self.args[1]


def unwritable(path: Path) -> str | None:
    """Why runs cannot be written under ``path`` (its nearest existing ancestor is a file, read-only
    or not writable), or ``None`` when they can."""
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only or not writable by this user"
    return None

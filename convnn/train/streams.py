"""Output to a closed pipe is dropped, never fatal: ``convnn-train ... | head`` trains on.

Python ignores SIGPIPE, so a write to a pipe whose reader has gone raises ``BrokenPipeError`` from
whatever ``print`` (an epoch line, a progress bar, the summary) hits it first, killing the run.
:func:`drop_output_to_closed_pipes` wraps ``sys.stdout`` and ``sys.stderr`` so that on the first such
error the stream's file descriptor is pointed at ``/dev/null``: what was buffered and everything
written later goes nowhere, and the run, its record and its exit status are unaffected.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Any, TextIO


class _ClosedPipeSafe:
    """A text stream that turns ``BrokenPipeError`` into silence (see the module docstring)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _is_pipe(stream: Any) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


def drop_output_to_closed_pipes() -> None:
    """Wrap ``sys.stdout`` / ``sys.stderr`` where they are pipes (idempotent; files, terminals and
    captured streams are left alone)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _ClosedPipeSafe) and _is_pipe(stream):
            setattr(sys, name, _ClosedPipeSafe(stream))

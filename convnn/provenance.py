"""How a result file was made: one header line naming the command, the commit, the machine and the date.

Every writer of ``results/`` (``convnn-tables``, ``scripts/bench_layers.py``, ``scripts/mini_cost.py``,
``scripts/make_accounting.py``) puts :func:`made_by`'s line at the top of what it writes (after a
Markdown title, behind ``#`` in CSV, ``%`` in LaTeX, as ``made_by`` in JSON, as the PNG
``Description``)::

    Made by `convnn-tables table=table1 source=runs/paper/table1` at commit 1a2b3c4d5e on AMD EPYC
    7R13 Processor (2 cores), 2026-12-07 10:31 UTC.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from convnn import __version__
from convnn.paths import PACKAGE_DIR

MARK = "Made by "


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(short: bool = False) -> str | None:
    """The checkout's ``HEAD`` commit (10 hex digits when ``short``); ``None`` outside a git checkout."""
    done = _git("rev-parse", "--short=10" if short else "--verify", "HEAD")
    if done is None or done.returncode != 0:
        return None
    return done.stdout.strip() or None


def code_state() -> str:
    """``commit 1a2b3c4d5e``, with ``(plus uncommitted changes)`` when tracked files outside ``results/``
    differ from it; ``convnn 0.1.0 (no git checkout)`` for an installed package."""
    commit = git_commit(short=True)
    if commit is None:
        return f"convnn {__version__} (no git checkout)"
    changed = _git("diff", "--quiet", "HEAD", "--", ".", ":(exclude)results")
    return f"commit {commit}" + (" (plus uncommitted changes)" if changed and changed.returncode else "")


def cpu_name() -> str:
    """The CPU model and this machine's core count, e.g. ``AMD EPYC 7R13 Processor (2 cores)``."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text(errors="replace").splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def script_command() -> str:
    """How this script was started, e.g. ``python scripts/bench_layers.py --device cuda`` (the script's
    path relative to the checkout when it lies inside it)."""
    script = Path(sys.argv[0]).resolve()
    root = PACKAGE_DIR.parent
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def made_by(command: str, machine: str | None = None, when: datetime | None = None) -> str:
    """The header line: ``Made by `<command>` at commit <hash> on <machine>, <date> UTC.``; ``machine``
    defaults to :func:`cpu_name` (give the GPU's name for work done on a GPU)."""
    when = when or datetime.now(UTC)
    return f"{MARK}`{command}` at {code_state()} on {machine or cpu_name()}, {when:%Y-%m-%d %H:%M} UTC."

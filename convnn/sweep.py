"""Sweep helpers: expand a paper experiment into jobs, list them, and decide which to skip.

A paper experiment is a *union* of Cartesian blocks ("rows", e.g. Table 2's
``layer=kvt_attention layer.k=100``) crossed with shared Cartesian axes ("params", e.g. ``data`` and
``seed``). Hydra's basic sweeper only knows the Cartesian product, so the ``paper`` sweeper
(``hydra_plugins/convnn_sweeper``) calls :func:`expand_jobs` here. Nothing in this module trains.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from convnn.records import RECORD_NAME, read_record


def override_key(override: str) -> str:
    """The config key an override sets: ``"+layer.k=3"`` -> ``"layer.k"``, ``"layer=a,b"`` -> ``"layer"``."""
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def cartesian(overrides: Sequence[str], parser: OverridesParser | None = None) -> list[list[str]]:
    """Every combination of the sweep overrides (``a=1,2 b=range(3)``), each as a list of overrides."""
    parser = parser or OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    return BasicSweeper.split_arguments(parsed, None)[0]


def expand_jobs(
    rows: Mapping[str, str] | None,
    params: Sequence[str],
    parser: OverridesParser | None = None,
) -> list[list[str]]:
    """The jobs of a sweep: for each row (a space-separated override string that may itself sweep,
    e.g. ``"layer.ratio=0.0,0.5 layer.patch=1"``) its Cartesian product with ``params``.

    No rows means the plain Cartesian product of ``params``. A key set both by a row and by
    ``params``, or two rows producing the same job, raise a ``ValueError``.
    """
    blocks = {name: shlex.split(text) for name, text in (rows or {"": ""}).items()}
    param_keys = {override_key(p) for p in params}
    jobs: list[list[str]] = []
    seen: dict[frozenset[str], str] = {}
    for name, block in blocks.items():
        clash = sorted(param_keys & {override_key(o) for o in block})
        if clash:
            raise ValueError(f"sweep row {name!r} sets {clash}, which the sweep params also set")
        for job in cartesian([*block, *params], parser):
            key = frozenset(job)
            if key in seen:
                raise ValueError(f"sweep rows {seen[key]!r} and {name!r} both produce the job {job}")
            seen[key] = name
            jobs.append(job)
    return jobs


def format_jobs(jobs: Sequence[Sequence[str]]) -> str:
    """A numbered listing of the jobs, one per line, headed by their count."""
    lines = [f"{len(jobs)} jobs"]
    lines += [f"{i:4d}  {' '.join(job)}" for i, job in enumerate(jobs)]
    return "\n".join(lines)


def should_skip(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a run record whose status is ``"finished"``.

    Runs that are ``"running"`` (killed) or ``"failed"`` are not skipped: training resumes them.
    """
    path = Path(run_dir) / RECORD_NAME
    return path.is_file() and read_record(path).get("status") == "finished"

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

    No rows means the plain Cartesian product of ``params``. A key given in ``params`` (the
    experiment's or the command line's) replaces that key in every row, so ``layer.ratio=0.5`` on the
    command line narrows a λ sweep; jobs that several rows produce are kept once, in row order.
    """
    param_keys = {override_key(p) for p in params}
    jobs: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for text in (rows or {"": ""}).values():
        block = [o for o in shlex.split(text) if override_key(o) not in param_keys]
        for job in cartesian([*block, *params], parser):
            if frozenset(job) not in seen:
                seen.add(frozenset(job))
                jobs.append(job)
    return jobs


def format_jobs(jobs: Sequence[Sequence[str]], finished: Sequence[Sequence[str]] = ()) -> str:
    """A numbered listing of the jobs to launch, one per line, headed by their count; ``finished``
    jobs (skipped) are listed after them."""
    lines = [f"{len(jobs)} jobs to launch" + (f", {len(finished)} finished (skipped)" if finished else "")]
    lines += [f"{i:4d}  {' '.join(job)}" for i, job in enumerate(jobs)]
    lines += [f"done  {' '.join(job)}" for job in finished]
    return "\n".join(lines)


def should_skip(run_dir: str | Path, epochs: int) -> bool:
    """True when ``run_dir`` holds a record with status ``"finished"`` and at least ``epochs`` epochs.

    Runs that are ``"running"`` (killed) or ``"failed"``, or finished with fewer epochs than asked
    for now, are not skipped: ``resume=true`` continues them from their last checkpoint.
    """
    path = Path(run_dir) / RECORD_NAME
    if not path.is_file():
        return False
    record = read_record(path)
    return record.get("status") == "finished" and len(record.get("epochs") or []) >= epochs


def with_resume(job: Sequence[str]) -> list[str]:
    """``job`` plus ``resume=true`` unless it sets ``resume`` itself (a died run then continues)."""
    return list(job) if any(override_key(o) == "resume" for o in job) else [*job, "resume=true"]

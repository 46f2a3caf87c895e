"""Sweep helpers: expand a paper experiment into jobs, list them, and decide which to skip.

A paper experiment is a *union* of Cartesian blocks ("rows", e.g. Table 2's
``layer=kvt_attention layer.k=100``) crossed with shared Cartesian axes ("params", e.g. ``data`` and
``seed``). Hydra's basic sweeper only knows the Cartesian product, so the ``paper`` sweeper
(``hydra_plugins/convnn_sweeper``) calls :func:`expand_jobs` here. Nothing in this module trains.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from convnn.runs.identity import identity_diff, run_identity
from convnn.runs.lock import lock_holder
from convnn.runs.records import RECORD_NAME, RecordError, read_record


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


@dataclass(frozen=True)
class JobOutcome:
    """One job of a sweep: ``status`` is ``launch`` (dry run), ``finished``, ``skipped`` (already
    finished, or running elsewhere) or ``failed``; ``reason`` says why for the last two."""

    job: tuple[str, ...]
    status: str
    reason: str = ""


def format_jobs(jobs: Sequence[Sequence[str]], outcomes: Sequence[JobOutcome] = ()) -> str:
    """The dry run's listing: the jobs to launch, numbered, headed by their count; then the jobs
    that will not be launched (finished, running elsewhere, or failing a check) with their reason."""
    head = f"{len(jobs)} jobs to launch"
    counts = {s: sum(o.status == s for o in outcomes) for s in ("skipped", "failed")}
    head += "".join(f", {n} {s}" for s, n in counts.items() if n)
    lines = [head, *(f"{i:4d}  {' '.join(job)}" for i, job in enumerate(jobs))]
    lines += [f"{o.status:8s}  {' '.join(o.job)}: {o.reason}" for o in outcomes]
    return "\n".join(lines)


def format_summary(outcomes: Sequence[JobOutcome]) -> str:
    """The sweep's final summary: ``N finished, N skipped, N failed``, then one line per job that did
    not finish (its overrides and the reason)."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "skipped", "failed")}
    lines = ["sweep summary: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    lines += [f"{o.status:8s}  {' '.join(o.job)}: {o.reason}" for o in outcomes if o.status != "finished"]
    return "\n".join(lines)


@dataclass(frozen=True)
class RunState:
    """What is in a run directory, for a (re-)launch with a given config.

    ``name``: ``"new"`` (no record), ``"finished"``, ``"unfinished"`` (killed, failed or interrupted:
    ``convnn-train`` resumes it from its checkpoint), ``"stale"`` (the record is of a different run:
    another identity or seed), ``"blocked"`` (failed in a way re-launching cannot fix: a corrupt
    checkpoint, divergence), ``"corrupt"`` (``results.json`` unreadable) or ``"running"`` (another
    live process holds the directory's lock). ``reason`` says why, for messages and sweep summaries.
    """

    name: str
    reason: str = ""
    record: dict[str, Any] | None = None


def run_state(run_dir: str | Path, config: Mapping[str, Any], check_lock: bool = False) -> RunState:
    """The :class:`RunState` of ``run_dir`` for a run with resolved ``config`` (same identity and
    seed as its record, see :func:`convnn.runs.identity.run_identity`). ``check_lock`` also reports a
    directory held by a live process as ``running`` (the sweeper's view; the run itself holds it)."""
    if check_lock and (holder := lock_holder(run_dir)):
        return RunState("running", f"in use by pid {holder.get('pid')} on {holder.get('host')}")
    path = Path(run_dir) / RECORD_NAME
    if not path.is_file():
        return RunState("new")
    try:
        record = read_record(path)
    except RecordError as e:
        return RunState("corrupt", str(e))
    old = {**run_identity(record.get("config") or {}), "seed": (record.get("config") or {}).get("seed")}
    new = {**run_identity(config), "seed": config.get("seed")}
    if old != new:
        return RunState("stale", f"its record differs in {', '.join(identity_diff(old, new))}", record)
    if record.get("status") == "finished" and len(record.get("epochs") or []) >= config["epochs"]:
        return RunState("finished", "", record)
    if record.get("resumable") is False:
        return RunState("blocked", f"{record.get('status')}: {record.get('error')}", record)
    return RunState(
        "unfinished", f"{record.get('status')} after {len(record.get('epochs') or [])} epochs", record
    )

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
from typing import Any

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


Jobs = Sequence[Sequence[str]]


def format_jobs(jobs: Jobs, finished: Jobs = (), queued: Jobs = ()) -> str:
    """A numbered listing of the jobs to launch, one per line, headed by their count; ``finished``
    jobs and ``queued`` ones (still held by the scheduler), both skipped, are listed after them."""
    head = f"{len(jobs)} jobs to launch"
    head += f", {len(finished)} finished (skipped)" if finished else ""
    head += f", {len(queued)} queued or running (skipped)" if queued else ""
    lines = [head, *(f"{i:4d}  {' '.join(job)}" for i, job in enumerate(jobs))]
    lines += [f"done  {' '.join(job)}" for job in finished]
    lines += [f"held  {' '.join(job)}" for job in queued]
    return "\n".join(lines)


# What a run computes; a record whose config differs here (e.g. the budget's subset was redefined) is stale.
COMPUTED_KEYS = (
    "model",
    "layer",
    "data.name",
    "data.subset",
    "epochs",
    "batch_size",
    "optim",
    "scheduler",
    "seed",
)


def _select(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def run_state(run_dir: str | Path, config: Mapping[str, Any]) -> str:
    """What re-launching a job with resolved ``config`` into ``run_dir`` should do:

    ``"new"`` (no record), ``"finished"`` (skip it), ``"unfinished"`` (killed or failed: resume it from
    its checkpoint) or ``"stale"`` (its record was made with a different ``COMPUTED_KEYS`` config: start
    it afresh).
    """
    path = Path(run_dir) / RECORD_NAME
    if not path.is_file():
        return "new"
    record = read_record(path)
    if any(_select(record.get("config", {}), k) != _select(config, k) for k in COMPUTED_KEYS):
        return "stale"
    done = record.get("status") == "finished" and len(record.get("epochs") or []) >= config["epochs"]
    return "finished" if done else "unfinished"


def relaunch(job: Sequence[str], state: str) -> list[str]:
    """The job as launched: ``resume=true`` (continue a died run; a new one starts afresh anyway), or
    ``resume=false`` for a stale run, unless the job sets ``resume`` itself."""
    if any(override_key(o) == "resume" for o in job):
        return list(job)
    return [*job, f"resume={'false' if state == 'stale' else 'true'}"]

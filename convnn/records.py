"""The run record: one ``results.json`` per run, the source of truth for tables.

A record is a JSON object with the fields listed in ``RECORD_FIELDS`` (accuracies in percent,
0-100, like the paper). It is written atomically, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RECORD_NAME = "results.json"
STATUSES = ("running", "finished", "failed")
EPOCH_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc1",
    "train_acc5",
    "test_loss",
    "test_acc1",
    "test_acc5",
    "test_loss_batchmean",
    "test_acc1_batchmean",
    "epoch_time_s",
    "images_per_s",
)
RECORD_FIELDS = (
    "schema",
    "status",
    "error",
    "config",
    "experiment",
    "overrides",
    "run_dir",
    "git_commit",
    "versions",
    "device",
    "seed",
    "budget",
    "params",
    "trainable_params",
    "gflops",
    "gflops_profiler",
    "epochs",
    "final",
    "best",
    "wall_time_s",
    "started_at",
    "finished_at",
)


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: str | Path) -> dict[str, Any]:
    """Read one record; ``path`` is a ``results.json`` file or the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    with open(path) as f:
        return json.load(f)


def collect_records(root: str | Path) -> list[dict[str, Any]]:
    """Every record under ``root`` (walked recursively), sorted by run directory."""
    paths = sorted(Path(root).rglob(RECORD_NAME))
    return [read_record(p) for p in paths]


def summarize_epochs(epochs: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(final, best)`` from per-epoch rows: the last epoch's test metrics and the best-top-1 epoch's.

    Ties in top-1 go to the earlier epoch. Both are ``None`` when no epoch has finished. The per-batch
    means (``test_loss_batchmean``, ``test_acc1_batchmean``) are copied where the epochs have them.
    """
    if not epochs:
        return None, None
    keys = ("test_loss", "test_acc1", "test_acc5", "test_loss_batchmean", "test_acc1_batchmean")
    last = epochs[-1]
    top = max(epochs, key=lambda row: (row["test_acc1"], -row["epoch"]))
    final = {k: last[k] for k in keys if k in last}
    best = {"epoch": top["epoch"], **{k: top[k] for k in keys if k in top}}
    return final, best

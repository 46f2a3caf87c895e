"""Experiment loggers for training: CSV (local), wandb (online when it can be, else offline), or none.

wandb never prompts: without an API key or without a network it runs offline (the run is written
under ``<run_dir>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``), and the
``WANDB_MODE`` environment variable (``disabled``, ``offline``, ``online``) always wins.
"""

from __future__ import annotations

import csv
import hashlib
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from convnn.runs.records import LOGGED_ONCE
from convnn.train.config import LoggerConfig


def _has_wandb_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str) -> str:
    """The wandb mode to run in: ``$WANDB_MODE`` if set, else ``requested`` unless it is ``auto``, which
    means ``online`` when an API key and the wandb server are both there and ``offline`` otherwise."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    return "online" if _has_wandb_key(host) and _reachable(host) else "offline"


def _csv_logger(run_dir: Path, keep_epochs: int) -> CSVLogger:
    """Lightning's CSV logger at ``<run_dir>/logs/metrics.csv``, keeping the rows of the first
    ``keep_epochs`` epochs of an earlier process (Lightning deletes the file when it starts)."""
    path = run_dir / "logs" / "metrics.csv"
    kept: list[dict[str, str]] = []
    if keep_epochs and path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            kept = [row for row in reader if row.get("epoch") and float(row["epoch"]) <= keep_epochs]
    logger = CSVLogger(save_dir=str(run_dir), name="logs", version="")
    if kept:
        logger.experiment  # creates the writer, which removes the old file  # noqa: B018
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
    return logger


def build_logger(
    cfg: LoggerConfig,
    run_dir: Path,
    experiment: str,
    run_name: str,
    config: dict[str, Any],
    keep_epochs: int = 0,
) -> Logger | bool:
    """The Lightning logger for ``logger.name`` (``False`` for ``none``).

    wandb: project ``logger.project``, group ``logger.group`` or the experiment name, run name and a
    stable id derived from the run directory (so a resumed run continues the same wandb run).
    ``keep_epochs``: a resumed run's epochs so far, whose CSV rows stay.
    """
    if cfg.name == "none":
        return False
    if cfg.name == "csv":
        return _csv_logger(run_dir, keep_epochs)
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    logger = WandbLogger(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group or experiment.replace("/", "-"),
        name=run_name,
        id=run_id,
        save_dir=str(run_dir),
        mode=wandb_mode(cfg.mode),
        resume="allow",
        config=config,
    )
    return logger


def log_accounting(logger: Logger | bool, record: dict[str, Any]) -> None:
    """Log the model's size and cost and the device once, as hyper-parameters (CSV: ``hparams.yaml``;
    wandb: config), the fields :data:`convnn.runs.records.LOGGED_ONCE` names."""
    if logger:
        logger.log_hyperparams({k: record[k] for k in LOGGED_ONCE})


def close_logger(logger: Logger | bool, record: dict[str, Any]) -> None:
    """wandb: put the final and best test values and the status into the run summary and finish the
    run (flushing it to disk or the server; a sweep's next job starts a new run)."""
    if not isinstance(logger, WandbLogger):
        return
    summary = {"status": record["status"], "wall_time_s": record["wall_time_s"]}
    for part in ("final", "best"):
        summary.update({f"{part}/{k}": v for k, v in (record[part] or {}).items()})
    logger.experiment.summary.update(summary)
    logger.experiment.finish(exit_code=0 if record["status"] == "finished" else 1)

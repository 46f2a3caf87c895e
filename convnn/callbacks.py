"""Lightning callbacks of a training run: the run-record writer, checkpoints, the progress bar."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from convnn.config import TrainConfig
from convnn.records import summarize_epochs, write_record

LAST_CHECKPOINT = "last"  # checkpoints/last.ckpt, replaced after every epoch


class RecordCallback(Callback):
    """Keeps ``results.json`` current: written at the start, after every epoch and at the end.

    ``record["wall_time_s"]`` counts every process that worked on the run (a resumed run adds to it).
    Only rank 0 writes (``enabled``).
    """

    def __init__(self, record: dict[str, Any], path: Path, enabled: bool = True) -> None:
        self.record, self.path, self.enabled = record, path, enabled
        self._wall_before = record["wall_time_s"]
        self._start = 0.0

    def _write(self, history: list[dict[str, float]], elapsed: float) -> None:
        self.record["epochs"] = list(history)
        self.record["final"], self.record["best"] = summarize_epochs(history)
        self.record["wall_time_s"] = self._wall_before + elapsed
        if self.enabled:
            write_record(self.path, self.record)

    def start(self, start: float) -> None:
        """Mark the process's start time (``time.perf_counter()``) and write the ``running`` record."""
        self._start = start
        self._write(self.record["epochs"], 0.0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._write(pl_module.history, time.perf_counter() - self._start)

    def finish(self, history: list[dict[str, float]], elapsed: float, error: str | None) -> None:
        """Write the final record: ``finished``, or ``failed`` with ``error``."""
        self.record["status"] = "failed" if error else "finished"
        self.record["error"] = error
        self.record["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self._write(history, elapsed)


def build_callbacks(cfg: TrainConfig, ckpt_dir: Path) -> list[Callback]:
    """Checkpoints (``checkpoints/last.ckpt``, replaced every epoch; ``checkpoint.enabled``), progress bar."""
    callbacks: list[Callback] = []
    if cfg.checkpoint.enabled:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                filename=LAST_CHECKPOINT,
                save_top_k=1,
                every_n_epochs=1,
                enable_version_counter=False,
            )
        )
    if cfg.trainer.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    elif cfg.trainer.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    return callbacks

"""Lightning callbacks of a training run: the run-record keeper, checkpoints, the progress bar."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from convnn.runs.checkpoints import LAST_CHECKPOINT
from convnn.runs.records import RunRecord
from convnn.train.config import TrainConfig


class Diverged(RuntimeError):
    """A non-finite loss ended epoch ``epoch`` (1-based)."""

    def __init__(self, epoch: int, values: dict[str, float]) -> None:
        self.epoch = epoch
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        super().__init__(f"non-finite loss in epoch {epoch} ({shown})")


def format_epoch(row: dict[str, Any], epochs: int) -> str:
    """One terminal line per epoch: ``epoch 2/5: train loss 2.1 acc 21.3% | test loss ... (12.0 s)``."""

    def part(split: str) -> str:
        return f"{split} loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc1']:.2f}%"

    return f"epoch {row['epoch']}/{epochs}: {part('train')} | {part('test')} ({row['epoch_time_s']:.1f} s)"


class RecordCallback(Callback):
    """Owns the run's epoch history and keeps ``record`` (:class:`convnn.runs.records.RunRecord`) current.

    After every test epoch it appends the module's ``epoch_metrics`` (numbered from 1) to
    ``history``, writes the record, prints one line (``verbose``) and raises :class:`Diverged` on a
    non-finite loss, before that epoch's checkpoint is written. ``history`` is this callback's
    checkpoint state, so a resumed run continues it; :meth:`interrupt` closes the record with the
    epochs the last checkpoint on disk holds (:meth:`checkpoint_written` is the checkpoint writer's
    ``on_written``).
    """

    def __init__(self, record: RunRecord, verbose: bool = True) -> None:
        self.record, self.verbose = record, verbose
        self.history: list[dict[str, Any]] = []
        self.checkpointed: int | None = None  # epochs of the last checkpoint on disk; None: none yet
        self.saving: int | None = None  # epochs of the checkpoint being written

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saving = len(self.history)

    def checkpoint_written(self) -> None:
        """The checkpoint built last is now the file on disk."""
        self.checkpointed = self.saving

    def interrupt(self, signal_name: str) -> None:
        """Close the record as interrupted by ``signal_name``, keeping only the epochs the last
        checkpoint holds (a signal between an epoch's record and its checkpoint would otherwise list an
        epoch the resume trains again); without any checkpoint it keeps them all."""
        if self.checkpointed is not None and self.checkpointed < len(self.history):
            self.record.update(self.history[: self.checkpointed])
        self.record.interrupt(signal_name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.checkpointed = len(self.history)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history:
            self.record.update(self.history)
            if self.verbose:
                where, epoch = self.record.path.parent, len(self.history) + 1
                print(f"resuming {where} from epoch {epoch} of {trainer.max_epochs}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        row = {"epoch": trainer.current_epoch + 1, **pl_module.epoch_metrics}
        self.history.append(row)
        self.record.update(self.history)
        bad = {k: v for k, v in row.items() if k.endswith("loss") and not math.isfinite(v)}
        if bad:
            raise Diverged(row["epoch"], bad)
        if self.verbose:
            print(format_epoch(row, trainer.max_epochs), flush=True)


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
        callbacks.append(RichBar())
    elif cfg.trainer.progress_bar == "tqdm":
        callbacks.append(TqdmBar())
    return callbacks


def epoch_label(trainer: L.Trainer) -> str:
    """``Epoch 3/150``: epochs numbered from 1, as in the record, the CSV and wandb."""
    return f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"


class RichBar(RichProgressBar):
    """Lightning's rich bar with epochs numbered from 1."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{epoch_label(self.trainer):{len(self.validation_description)}}"


class TqdmBar(TQDMProgressBar):
    """Lightning's tqdm bar with epochs numbered from 1."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_label(trainer))

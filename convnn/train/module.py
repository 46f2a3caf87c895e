"""The ``LightningModule`` that trains any backbone: loss, metrics, optimiser.

Each epoch it measures train loss / top-1 / top-5 (running over the epoch's batches), then test
loss / top-1 / top-5 on the test split (Lightning's validation loop), the training time and
throughput, logs them (epochs numbered from 1) and leaves them in ``epoch_metrics`` (accuracies in
percent) for the record callback, which owns the epoch history (:mod:`convnn.train.callbacks`). Test loss
and top-1 are measured twice: per image (``test_loss``, ``test_acc1``: every image weighs the same)
and as the mean of per-batch means (``test_loss_batchmean``, ``test_acc1_batchmean``: every batch
weighs the same, a short last batch included), which is how the paper's reference averaged them.
The metrics accumulate as device tensors without a host sync per step (:mod:`convnn.train.metrics`);
they are read once per epoch.
Under DDP both are taken over all ranks: a batch is the global batch (``eval_batch_size``, the
paper's 256) whichever ranks evaluated its parts, and ``test_images`` counts the images evaluated.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from convnn.layers import reset_sampling
from convnn.runs.records import logged_name
from convnn.train.config import OptimConfig, SchedulerConfig
from convnn.train.metrics import TopKAccuracy, WeightedMean

SPLITS = ("train", "test")


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed python, numpy and torch for training epoch ``epoch`` (0-based) of a run seeded ``seed``.

    Every random draw of an epoch (data-loader worker seeds, augmentation, dropout) then depends on
    ``(seed, epoch)`` only, not on what ran before it in the process, which makes resuming exact.
    """
    L.seed_everything((seed * 1_000_003 + epoch + 1) % 2**32, workers=True, verbose=False)


def lr_factor(epoch: int, epochs: int, cfg: SchedulerConfig, base_lr: float) -> float:
    """Multiplier of the base learning rate in ``epoch`` (0-based): linear warm-up, then the schedule."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    done = epoch - cfg.warmup_epochs
    if cfg.name == "cosine":
        floor = cfg.min_lr / base_lr
        progress = done / max(1, epochs - cfg.warmup_epochs)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "step":
        return cfg.gamma ** (done // cfg.step_size)
    return 1.0


class GlobalBatchMeans(Metric):
    """Test loss and top-1 as the mean of per-batch means, a batch being a global batch.

    Each rank adds, per global batch ``j``, its images' loss sum, correct count and number
    (``update``); ``compute`` adds them up over the ranks (a DDP sync: the rows are gathered, no
    padding), then averages the per-batch loss and top-1 over the batches. Returns
    ``{"test_loss_batchmean", "test_acc1_batchmean" (fraction), "test_images"}``.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, batch: int, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        """Global batch ``batch``: ``loss`` (mean over this rank's ``count`` images, scalar),
        ``correct`` (``[count]`` bool)."""
        row = torch.empty(4, device=loss.device)  # float32: exact for indices and counts below 2**24
        row[0], row[3] = batch, count  # fills: no host-to-device copy
        row[1:3] = torch.stack([loss.detach().float() * count, correct.sum().float()])
        self.rows.append(row[None])

    def compute(self) -> dict[str, torch.Tensor]:
        rows = dim_zero_cat(self.rows).cpu().double()  # once per epoch; float64 sums on any device
        batches = rows[:, 0].long()
        sums = torch.zeros(int(batches.max()) + 1, 3, dtype=torch.float64)
        sums.index_add_(0, batches, rows[:, 1:])
        sums = sums[sums[:, 2] > 0]
        means = sums[:, :2] / sums[:, 2:]
        return {
            "test_loss_batchmean": means[:, 0].mean(),
            "test_acc1_batchmean": means[:, 1].mean(),
            "test_images": sums[:, 2].sum(),
        }


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of ``model`` (``[B, C, H, W] -> [B, num_classes]`` logits).

    Randomness is a function of ``(seed, epoch)``: every train epoch starts with ``seed_epoch`` and
    reseeds the random-candidate layers (``reset_sampling``) with ``seed + 1 + epoch``; every test
    epoch reseeds them with ``seed``, so evaluation is reproducible. A resumed run reseeds for its
    first epoch while the checkpoint is loaded, before Lightning creates the data iterator, which is
    where an uninterrupted run stands at that epoch's start.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        epochs: int,
        optim: OptimConfig,
        scheduler: SchedulerConfig,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.epochs, self.optim_cfg, self.sched_cfg = epochs, optim, scheduler
        self.seed = seed
        self.criterion = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict()
        for split in SPLITS:
            self.metrics[f"{split}_loss"] = WeightedMean()
            self.metrics[f"{split}_acc1"] = TopKAccuracy(1)
            self.metrics[f"{split}_acc5"] = TopKAccuracy(top5)
        self.metrics["test_batches"] = GlobalBatchMeans()
        self.epoch_metrics: dict[str, float] = {}
        self._train_start = self._train_time = 0.0
        self._train_images = 0
        self._reseeded_on_load = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` logits."""
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.metrics[f"{split}_loss"].update(loss.detach(), weight=y.numel())
        self.metrics[f"{split}_acc1"].update(logits.detach(), y)
        self.metrics[f"{split}_acc5"].update(logits.detach(), y)
        if split == "test":  # this rank's part of global batch ``batch_idx`` (RankBatches)
            self.metrics["test_batches"].update(batch_idx, loss, logits.detach().argmax(-1) == y, y.numel())
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._train_images += batch[1].numel()
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def on_train_epoch_start(self) -> None:
        if self._reseeded_on_load:
            self._reseeded_on_load = False
        else:
            seed_epoch(self.seed, self.current_epoch)
        reset_sampling(self.model, self.seed + 1 + self.current_epoch)
        self._train_images = 0
        self._train_start = time.perf_counter()

    def _fitting(self) -> bool:
        return self.trainer.state.fn == TrainerFn.FITTING

    def on_validation_epoch_start(self) -> None:
        if self._fitting():
            self._train_time = time.perf_counter() - self._train_start
        reset_sampling(self.model, self.seed)

    def _compute(self, split: str) -> dict[str, float]:
        out = {}
        for name in [f"{split}_{name}" for name in ("loss", "acc1", "acc5")]:
            metric = self.metrics[name]
            out[name] = metric.compute().item() * (1.0 if "_loss" in name else 100.0)
            metric.reset()
        if split == "test":
            batches = self.metrics["test_batches"]
            means = {k: v.item() for k, v in batches.compute().items()}
            batches.reset()
            out |= {
                "test_loss_batchmean": means["test_loss_batchmean"],
                "test_acc1_batchmean": means["test_acc1_batchmean"] * 100.0,
                "test_images": int(means["test_images"]),
            }
        return out

    def on_validation_epoch_end(self) -> None:
        if not self._fitting():
            self._compute("test")
            return
        images = self._train_images * self.trainer.world_size
        self.epoch_metrics = {
            **self._compute("train"),
            **self._compute("test"),
            "epoch_time_s": self._train_time,
            "images_per_s": images / self._train_time if self._train_time > 0 else 0.0,
        }
        # float64 tensors (Lightning makes a float a float32 tensor): the loggers get the record's values
        values = {**self.epoch_metrics, "epoch": float(self.current_epoch + 1)}
        logged = {logged_name(k): torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
        self.log_dict(logged, sync_dist=True, batch_size=1)

    def configure_optimizers(self) -> Any:
        o = self.optim_cfg
        if o.name == "adamw":
            opt = torch.optim.AdamW(
                self.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas)
            )
        else:
            opt = torch.optim.SGD(
                self.parameters(), lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum
            )
        if self.sched_cfg.name == "none" and self.sched_cfg.warmup_epochs == 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(e, self.epochs, self.sched_cfg, o.lr)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Seed the next epoch (checkpoints are written at the end of an epoch)."""
        seed_epoch(self.seed, checkpoint["epoch"] + 1)
        self._reseeded_on_load = True

"""The epoch metrics of training and test, accumulated as device tensors: no update reads a value on
the host, so a training step never waits for the GPU; the values are read once per epoch.

They compute what torchmetrics' ``MeanMetric`` (weighted) and micro ``MulticlassAccuracy`` compute,
to the bit, and sum over DDP ranks like them; those read the inputs on the host on every update
(``MeanMetric``'s NaN check; the accuracy's argument validation and, on CPU, ``one_hot``'s range
check) and so synchronise with the GPU several times per step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class WeightedMean(Metric):
    """``sum(value * weight) / sum(weight)`` over an epoch of scalar ``value`` s, in float32.

    A NaN value makes the mean NaN (``MeanMetric`` drops it with a warning), which the divergence
    check then reports.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: int = 1) -> None:
        """Add a 0-d ``value`` (on the metric's device; cast to float32 first) of weight ``weight``."""
        self.total += value.to(self.total.dtype) * weight
        self.weight += weight

    def compute(self) -> Tensor:
        return self.total / self.weight


class TopKAccuracy(Metric):
    """The fraction of ``[B, classes]`` logits whose ``top_k`` largest include the ``[B]`` label, over an
    epoch: ``argmax`` for top-1, ``torch.topk`` otherwise (ties as torchmetrics breaks them), a
    float32 ratio of integer counts."""

    full_state_update = False

    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Count the ``[B]`` labels ``target`` among the ``top_k`` largest of ``logits [B, classes]``."""
        if self.top_k == 1:
            hits = logits.argmax(-1) == target
        else:
            hits = (logits.topk(self.top_k, dim=-1).indices == target.unsqueeze(-1)).any(-1)
        self.correct += hits.sum()
        self.total += target.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.float()

"""The paper authors' own per-epoch training logs, as data (``results/paper/authors/``; MIT-licensed,
Copyright (c) 2024 and 2025 Mingi Kang: see the README there for the source repositories and commits).

``runs.csv`` holds one row per run (its folder under the authors' ``Final_Output/``, the GFLOPs and
parameters it printed, every argument of its ``args.txt``); ``curves.csv`` one row per run and epoch
(train / test loss and top-1 / top-5 in percent; the test numbers are the mean of per-batch means at
batch 256, as the authors' code averaged). A run is named by its ``run`` column, e.g.
``Final_Output/BR_test_cos---/VGG11-CIFAR10/BranchingConvNN_All_K9_Col_Col_br0000_s42``; the paper
CSVs' ``authors_run`` column names the run behind each printed cell.

**Epoch-to-epoch noise** (:func:`local_noise`): one run is one seed, and its value at epoch E moves from
epoch to epoch by more than its trend does. The noise at E is the residual standard deviation of a
least-squares quadratic in the epoch over the ``NOISE_WINDOW`` = 7 epochs nearest E (E − 3 … E + 3,
shifted inside the logged epochs at either end), with the fit's 3 parameters taken off the degrees of
freedom: ``sqrt(sum(residual²) / (7 − 3))``. Where the authors ran one configuration twice (Conv2D,
λ = 0.5 and ConvNN on both datasets, Table 1 and Figure 3), the two runs' difference at E over the sum
of their squared noises averages about 1 over epochs 1–60 (``tests/test_authors.py`` checks it).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from convnn.paths import PAPER_DIR

AUTHORS_DIR = PAPER_DIR / "authors"
METRICS = ("train_loss", "train_acc1", "train_acc5", "test_loss", "test_acc1", "test_acc5")
NOISE_WINDOW = 7
NOISE_DEGREE = 2


@cache
def read_runs(directory: Path = AUTHORS_DIR) -> dict[str, dict[str, str]]:
    """Every run of ``runs.csv`` by its ``run`` name: its arguments as printed (strings)."""
    with open(directory / "runs.csv", newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


@cache
def read_curves(directory: Path = AUTHORS_DIR) -> dict[str, dict[str, tuple[float, ...]]]:
    """Every run's per-epoch ``METRICS`` (and ``epoch``) from ``curves.csv``: ``{run: {metric: values}}``,
    ``values[e - 1]`` the value after epoch ``e``."""
    columns: dict[str, dict[str, list[float]]] = {}
    with open(directory / "curves.csv", newline="") as f:
        for row in csv.DictReader(f):
            run = columns.setdefault(row["run"], {k: [] for k in ("epoch", *METRICS)})
            for key, values in run.items():
                values.append(float(row[key]))
    return {run: {k: tuple(v) for k, v in metrics.items()} for run, metrics in columns.items()}


def curve(run: str, metric: str) -> tuple[float, ...]:
    """Run ``run``'s ``metric`` after each epoch (index ``e - 1`` for epoch ``e``); an unknown run or
    metric raises a ``ValueError`` naming it."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {list(METRICS)}")
    curves = read_curves()
    if run not in curves:
        raise ValueError(f"no authors' run {run!r} in {AUTHORS_DIR / 'curves.csv'}")
    return curves[run][metric]


def value_at(run: str, epoch: int, metric: str) -> float | None:
    """``metric`` of ``run`` after epoch ``epoch`` (1-based); ``None`` beyond the run's last epoch."""
    values = curve(run, metric)
    return values[epoch - 1] if 1 <= epoch <= len(values) else None


def local_noise(
    values: Sequence[float], epoch: int, window: int = NOISE_WINDOW, degree: int = NOISE_DEGREE
) -> float | None:
    """The epoch-to-epoch noise of a curve around ``epoch`` (1-based; ``values[e - 1]`` at epoch ``e``):
    the residual std of a degree-``degree`` least-squares fit over the ``window`` epochs nearest
    ``epoch`` (shifted inside the curve at its ends), ``sqrt(sum r² / (window - degree - 1))``.
    ``None`` when the curve is shorter than the window or ``epoch`` lies outside it."""
    if len(values) < window or not 1 <= epoch <= len(values):
        return None
    start = min(max(epoch - 1 - window // 2, 0), len(values) - window)
    epochs = np.arange(window, dtype=float) - window // 2  # centred: a well-conditioned fit
    ys = np.asarray(values[start : start + window], dtype=float)
    residuals = ys - np.polyval(np.polyfit(epochs, ys, degree), epochs)
    return math.sqrt(float(residuals @ residuals) / (window - degree - 1))


def noise(run: str, epoch: int, metric: str) -> float | None:
    """:func:`local_noise` of ``run``'s ``metric`` curve around ``epoch``."""
    return local_noise(curve(run, metric), epoch)


def gap_uncertainty(std: float | None, noise: float | None) -> float | None:
    """The uncertainty ``u = sqrt(std² + noise²)`` of a gap between our seeds' mean (sample std ``std``)
    and one authors' run (epoch noise ``noise``). With one seed (``std`` None) our run is taken to be
    as noisy as theirs: ``u = sqrt(2) * noise``. ``None`` without the noise."""
    if noise is None:
        return None
    return math.hypot(noise if std is None else std, noise)


def compare_at(
    run: str | None, epoch: int | None, metric: str, mean: float | None, std: float | None
) -> dict[str, float | None]:
    """Our ``mean`` ± ``std`` of ``metric`` at epoch ``epoch`` against the authors' run ``run`` at the
    same epoch: ``authors`` (their value), ``authors_noise`` (:func:`noise`), ``gap`` (ours − theirs)
    and ``gap_u`` (:func:`gap_uncertainty`); ``None`` where a part is missing (no run, no epoch, an
    epoch past their log)."""
    authors = None if run is None or epoch is None else value_at(run, epoch, metric)
    spread = None if authors is None else noise(run, epoch, metric)
    gap = None if mean is None or authors is None else mean - authors
    return {
        "authors": authors,
        "authors_noise": spread,
        "gap": gap,
        "gap_u": None if gap is None else gap_uncertainty(std, spread),
    }

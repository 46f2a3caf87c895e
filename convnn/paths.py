"""Where the package's files live: the Hydra configs, the experiments and the paper's CSVs.

From a source checkout they are the top-level ``configs/``, ``experiments/`` and ``results/paper/``;
a wheel (``pip install .``) ships the same files as package data under ``convnn/_data/``. Every
module that reads them takes its path from here.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_ROOT = PACKAGE_DIR / "_data" if (PACKAGE_DIR / "_data").is_dir() else None


def _located(name: str, in_checkout: str) -> Path:
    return DATA_ROOT / name if DATA_ROOT is not None else PACKAGE_DIR.parent / in_checkout


CONFIG_DIR = _located("configs", "configs")
EXPERIMENTS_DIR = _located("experiments", "experiments")
PAPER_DIR = _located("paper", "results/paper")
BENCH_DIR = PACKAGE_DIR.parent / "results" / "bench"  # measured here; a checkout only (not in a wheel)

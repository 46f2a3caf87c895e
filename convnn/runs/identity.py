"""Which run is this: the run identity of an effective (resolved) training config.

The identity is everything that changes what a run computes (model, layer, data and its subsets,
optimiser, schedule, epochs, batch sizes, precision, augmentation); not the seed and not bookkeeping
(paths, logging, devices, progress bar, checkpointing, the budget's *label*). Runs with equal
identities are seeds of one experiment: the run directory check in ``convnn-train``, the sweeper's
skip / stale decision and the table and figure matching all use :func:`run_identity`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

BOOKKEEPING_KEYS = (
    "name",
    "seed",
    "resume",
    "overwrite",
    "out_dir",
    "budget",
    "logger",
    "checkpoint",
    "data.root",
    "data.download",
    "data.format",
    "data.num_workers",
    "data.pin_memory",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.compile",
    "trainer.deterministic",
    "trainer.progress_bar",
    "trainer.threads",
)
BUDGET_KEYS = ("epochs", "batch_size", "eval_batch_size", "data.subset", "data.train_size", "data.test_size")


def _drop(config: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def select(config: Mapping[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"`` (``None`` where a part is missing)."""
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def run_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved ``config`` minus the seed and the ``BOOKKEEPING_KEYS`` (a new dict)."""
    ident = copy.deepcopy(dict(config))
    for key in BOOKKEEPING_KEYS:
        _drop(ident, key)
    return ident


def canonical(value: Any) -> Any:
    """``value`` with every number a float (``0`` and ``0.0`` are one value, as ``==`` says; bools
    stay bools), tuples as lists, nested containers alike."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def identity_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of :func:`run_identity` (16 hex digits), for grouping and file names; equal
    identities (``==``, so ``layer.ratio=0`` and ``0.0`` alike) have equal keys."""
    text = json.dumps(canonical(run_identity(config)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys where two identities (or configs) differ, sorted."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += identity_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def effective_budget(config: Mapping[str, Any]) -> dict[str, Any]:
    """The budget values a run actually used (epochs, batch sizes, data subsets), whatever its label."""
    return {key: select(config, key) for key in BUDGET_KEYS}


ROW_KEYS = ("model", "layer", "data.name", "optim.lr")
DATASET_KEYS = (
    "data.num_classes",
    "data.image_size",
    "data.in_channels",
    "data.mean",
    "data.std",
    "data.train_split",
    "data.test_split",
)


def row_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the identity a paper table's row fixes: model, layer, dataset and learning rate."""
    return {key: select(config, key) for key in ROW_KEYS}


def setup_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rest of the identity: the training setup shared by a table's cells (epochs, batch, subsets,
    optimiser but its lr, schedule, augmentation, precision). A table never mixes two setups."""
    ident = run_identity(config)
    for key in (*ROW_KEYS, *DATASET_KEYS):
        _drop(ident, key)
    return ident

"""What a sweep will cost before it runs: projected GPU-hours and peak GPU memory per job.

A job's epoch time comes from our committed CUDA bench (``results/bench/train-cuda.json``, written by
``make gpu-check``) where it measured the job's layer and backbone, else from the authors' logs
(``results/paper/authors/epoch_times.csv``: every logged run's median epoch time on their A100, derived from
their ``curves.csv`` / ``runs.csv`` by ``scripts/derive_epoch_times.py``). Runs are matched by
:func:`cost_key` (the backbone and the layer settings that change its speed, not the dataset or the
seed): the same key first, else the same layer and backbone with other settings (:func:`near_key`).
A job is comparable when it trains the paper's backbone (its model config as ``configs/model/``
ships it, initialisation aside) on CIFAR-10/100 at batch 256; its cost is the epoch time times its
epochs times its share of the 50,000 training images. Peak memory is known only from our bench.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from convnn import paths

EPOCH_TIMES = paths.PAPER_DIR / "authors" / "epoch_times.csv"
BENCH_TRAIN = paths.BENCH_DIR / "train-cuda.json"
AUTHORS_GPU = "A100"
AUTHORS, BENCH = "the authors' logs", "our bench"  # where a reference epoch time comes from
CIFAR_TRAIN_IMAGES = 50_000
PAPER_BATCH = 256
PAPER_DATASETS = ("cifar10", "cifar100")
INIT_KEYS = ("classifier_init", "cls_init")  # change the start, not the speed

#: The cost key's fields (CSV columns of ``epoch_times.csv``) and their types; ``None`` where a field
#: does not apply (e.g. the conv branch's kernel when lambda = 1).
KEY_TYPES: dict[str, type] = {
    "model": str,
    "layer": str,
    "ratio": float,
    "sampling": str,
    "num_candidates": int,
    "k": int,
    "kernel_size": int,
    "select_by": str,
    "aggregate_position": bool,
    "patch": int,
    "aggregation": str,
    "heads": int,
    "sparse": str,
}


def _selection(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A k-NN layer's candidates and k: ``sampling``, ``num_candidates`` (``None`` for all), ``k``."""
    sampling = layer.get("sampling", "all")
    count = None if sampling == "all" else int(layer["num_candidates"])
    return {"sampling": sampling, "num_candidates": count, "k": int(layer.get("k", 9))}


def layer_key(model: str, layer: Mapping[str, Any]) -> dict[str, Any] | None:
    """The speed-relevant settings of ``layer`` in ``model`` (``vgg11`` / ``vit_tiny``), every field of
    :data:`KEY_TYPES` (``None`` where it does not apply); ``None`` for a layer the authors never ran there.
    VGG's ``conv2d`` and ``convnn`` are branching at lambda 0 and 1, as the authors ran them."""
    key: dict[str, Any] = dict.fromkeys(KEY_TYPES)
    name = layer.get("name")
    if model == "vgg11" and name in ("conv2d", "convnn", "branching"):
        ratio = {"conv2d": 0.0, "convnn": 1.0}.get(name, layer.get("ratio", 0.5))
        key.update(model=model, layer="branching", ratio=float(ratio), patch=int(layer.get("patch") or 1))
        if ratio < 1:
            key["kernel_size"] = int(layer.get("kernel_size", 3))
        if ratio > 0:
            key.update(
                _selection(layer),
                select_by=layer.get("select_by", "features"),
                aggregate_position=bool(layer.get("aggregate_position", False)),
            )
        return key
    if model != "vit_tiny" or name not in (
        "attention",
        "local_attention",
        "kvt_attention",
        "sparse_attention",
        "convnn_attention",
    ):
        return None
    key.update(model=model, layer=name, heads=int(layer.get("heads", 1)))
    if name == "kvt_attention":
        key["k"] = int(layer.get("k", 9))
    elif name == "sparse_attention":
        key["sparse"] = layer.get("mode", "local")  # ours: a local band; the authors' runs also strided
    elif name == "convnn_attention":
        key.update(_selection(layer), aggregation=layer.get("aggregation", "depthwise"))
    return key


@cache
def _shipped_model(name: str) -> dict[str, Any] | None:
    """``configs/model/<name>.yaml`` as shipped (``None`` when there is none)."""
    from omegaconf import OmegaConf

    path = paths.CONFIG_DIR / "model" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None  # type: ignore[return-value]


def cost_key(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`layer_key` of a resolved training ``config`` when it trains the paper's setup (the
    shipped backbone, CIFAR, batch 256), else ``None`` (no reference epoch time applies)."""
    model, data = config.get("model") or {}, config.get("data") or {}
    shipped = _shipped_model(str(model.get("name")))
    if shipped is None or data.get("name") not in PAPER_DATASETS or config.get("batch_size") != PAPER_BATCH:
        return None
    if any(model.get(k) != v for k, v in shipped.items() if k not in INIT_KEYS):
        return None
    return layer_key(model["name"], config.get("layer") or {})


def near_key(key: Mapping[str, Any]) -> tuple:
    """What a nearby reference shares with ``key`` when no run has the key itself: the backbone, the
    layer family, the sampling and for VGG the branch mix (conv only, ConvNN only or both)."""
    ratio = key["ratio"]
    mix = None if ratio is None else "conv" if ratio == 0 else "convnn" if ratio == 1 else "both"
    return key["model"], key["layer"], key["sampling"], mix


def _typed(row: Mapping[str, str]) -> dict[str, Any]:
    """The key of a CSV row: every :data:`KEY_TYPES` field parsed (empty: ``None``)."""
    out: dict[str, Any] = {}
    for name, kind in KEY_TYPES.items():
        text = row[name]
        out[name] = None if text == "" else (text == "True") if kind is bool else kind(text)
    return out


@dataclass(frozen=True)
class Reference:
    """An epoch time for a key: seconds, where it was measured (``device``), ``source`` (:data:`AUTHORS`
    or :data:`BENCH`) and how many runs it summarises; ``peak_mib`` when measured (our bench)."""

    epoch_s: float
    device: str
    source: str
    runs: int = 1
    peak_mib: float | None = None


@cache
def authors_runs(path: Path = EPOCH_TIMES) -> tuple[tuple[dict[str, Any], float], ...]:
    """``(key, median epoch seconds)`` of every authors' run in ``epoch_times.csv`` (its ``#`` line says
    how it was made)."""
    with path.open() as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return tuple((_typed(row), float(row["epoch_s"])) for row in rows)


def bench_rows(path: Path = BENCH_TRAIN) -> list[dict[str, Any]]:
    """The short trainings of our CUDA bench (``[]`` until ``make gpu-check`` has written one)."""
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    return [{**row, "device": report["device"]} for row in report.get("rows", []) if row.get("key")]


def reference(
    key: Mapping[str, Any], bench: Sequence[Mapping[str, Any]] = ()
) -> tuple[Reference, bool] | None:
    """The epoch time for ``key`` and whether it is exact (the same key) rather than near (the same
    layer and backbone, :func:`near_key`): our bench's row for the key first, then the median of
    the authors' runs with the key, then of those near it; ``None`` when none is."""
    for row in bench:
        if row["key"] == dict(key):
            peak = row.get("peak_reserved_mib")
            return Reference(row["projected_epoch_s"], row["device"], BENCH, 1, peak), True
    runs = authors_runs()
    same = [s for k, s in runs if k == dict(key)]
    if same:
        return Reference(statistics.median(same), AUTHORS_GPU, AUTHORS, len(same)), True
    near = [s for k, s in runs if near_key(k) == near_key(key)]
    if near:
        return Reference(statistics.median(near), AUTHORS_GPU, AUTHORS, len(near)), False
    return None


@dataclass
class SweepCost:
    """The projected cost of a sweep's jobs (see :func:`sweep_cost`)."""

    jobs: int = 0
    epochs: set[int] = field(default_factory=set)
    gpu_hours: float = 0.0
    exact: int = 0
    near: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # "A100 from the authors' logs" -> jobs
    unknown: dict[str, int] = field(default_factory=dict)  # "model / data" -> jobs without a reference
    peak_mib: float | None = None
    peak_jobs: int = 0  # jobs whose peak memory is measured

    def format(self) -> str:
        """One line: ``projected cost: J jobs x E epochs: H GPU-hours (...); peak GPU memory ...``."""
        if not self.jobs:
            return "projected cost: no jobs to launch"
        epochs = "/".join(str(e) for e in sorted(self.epochs)) or "?"
        head = f"projected cost: {self.jobs} jobs x {epochs} epochs"
        if self.exact + self.near:
            used = ", ".join(f"{source} for {n} jobs" for source, n in self.sources.items())
            near = f"; {self.near} from the same layer and backbone with other settings" if self.near else ""
            head += f": {self.gpu_hours:.1f} GPU-hours (epoch times: {used}{near})"
        if self.unknown:
            which = ", ".join(f"{what} ({n})" for what, n in self.unknown.items())
            head += f"; no reference epoch time for {sum(self.unknown.values())} jobs: {which}"
        if self.peak_mib is None:
            return head + "; peak GPU memory per job: not measured yet (make gpu-check)"
        return (
            head
            + f"; peak GPU memory per job: {self.peak_mib / 1024:.1f} GiB ({self.peak_jobs} jobs measured)"
        )


def sweep_cost(
    configs: Iterable[Mapping[str, Any]], bench: Sequence[Mapping[str, Any]] | None = None
) -> SweepCost:
    """The projected cost of jobs with resolved ``configs``: per job the :func:`reference` epoch time x
    its epochs x its share of CIFAR's training images (``data.subset.train``), summed in GPU-hours;
    the largest measured peak memory."""
    bench = bench_rows() if bench is None else bench
    cost = SweepCost()
    for config in configs:
        cost.jobs += 1
        cost.epochs.add(int(config["epochs"]))
        key = cost_key(config)
        found = reference(key, bench) if key else None
        if found is None:
            what = f"{(config.get('model') or {}).get('name')} / {(config.get('data') or {}).get('name')}"
            cost.unknown[what] = cost.unknown.get(what, 0) + 1
            continue
        ref, exact = found
        subset = ((config.get("data") or {}).get("subset") or {}).get("train")
        share = min(1.0, subset / CIFAR_TRAIN_IMAGES) if subset else 1.0
        cost.gpu_hours += ref.epoch_s * int(config["epochs"]) * share / 3600
        cost.exact += exact
        cost.near += not exact
        source = f"{ref.device} from {ref.source}"
        cost.sources[source] = cost.sources.get(source, 0) + 1
        if ref.peak_mib is not None:
            cost.peak_mib = max(cost.peak_mib or 0.0, ref.peak_mib)
            cost.peak_jobs += 1
    return cost

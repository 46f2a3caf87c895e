"""``convnn-profile``: parameters and GFLOPs of the model ``convnn-train`` would build for the same
``key=value`` arguments (``configs/profile.yaml`` is the training config, writing nothing), printed
as a table and, as the last line, one JSON object.

    convnn-profile model=vgg11 layer=branching layer.ratio=0.5 data=cifar10
    convnn-profile experiment=mini/table1

Bad input (an unknown key or option, a value the layer refuses) stops with one line and exit status 2,
as in ``convnn-train`` (:mod:`convnn.cli`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from convnn import paths
from convnn.cli import compose_or_fail, fail
from convnn.models.accounting import profile_model
from convnn.runs.errors import RunError
from convnn.train.app import build_model_or_fail

CONFIG_DIR = str(paths.CONFIG_DIR)
PROG = "convnn-profile"


def _print_table(record: dict[str, Any]) -> None:
    table = Table(title=f"{record['model']} x {record['layer']} on {record['data']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("input (one image)", "x".join(map(str, record["input_shape"])))
    table.add_row("parameters", f"{record['params']:,} ({record['params'] / 1e6:.3f}M)")
    table.add_row("trainable parameters", f"{record['trainable_params']:,}")
    table.add_row("GFLOPs, fvcore (multiply-adds)", f"{record['gflops']:.5f}")
    table.add_row("GFLOPs, torch.profiler (paper's method)", f"{record['gflops_profiler']:.5f}")
    table.add_row("ops fvcore did not count", ", ".join(sorted(record["unsupported_ops"])) or "-")
    Console().print(table)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The ``convnn-profile`` config (the training config's groups) for Hydra ``overrides``."""
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR, job_name=PROG):
        return compose(config_name="profile", overrides=list(overrides))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="profile")
def _hydra_app(cfg: DictConfig) -> None:
    """Build ``model`` x ``layer`` for ``data`` and print its accounting."""
    try:
        model, size = build_model_or_fail(cfg)
    except RunError as e:
        raise fail(PROG, str(e)) from None
    result = profile_model(model, (cfg.data.in_channels, size, size))
    record = {"model": cfg.model.name, "layer": cfg.layer.name, "data": cfg.data.name, **result}
    _print_table(record)
    print(json.dumps(record))


def main() -> None:
    """Console entry point ``convnn-profile``: composition errors in one line (exit 2) before Hydra
    runs; ``-m`` is refused (``convnn-tables table=<name> profile=true`` profiles a table's rows)."""
    args = sys.argv[1:]
    if any(a in ("-m", "--multirun") for a in args):
        raise fail(
            PROG,
            "-m: convnn-profile profiles one configuration; "
            "convnn-tables table=<name> profile=true profiles every row of a paper table",
        )
    compose_or_fail(PROG, "profile", args)
    _hydra_app()

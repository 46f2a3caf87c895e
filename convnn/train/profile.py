"""``convnn-profile model=... layer=... data=...``: parameters and GFLOPs of one backbone x layer x
dataset (the training config groups), printed as a table and, as the last line, one JSON object."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from convnn import paths
from convnn.models import build_from_config
from convnn.models.accounting import profile_model

CONFIG_DIR = str(paths.CONFIG_DIR)


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
    """The ``convnn-profile`` config (``data``, ``model``, ``layer`` groups) for Hydra ``overrides``."""
    with initialize_config_dir(version_base=None, config_dir=CONFIG_DIR, job_name="convnn-profile"):
        return compose(config_name="profile", overrides=list(overrides))


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="profile")
def main(cfg: DictConfig) -> None:
    """``convnn-profile``: build ``model`` x ``layer`` for ``data`` and print its accounting."""
    try:
        model, shape = build_from_config(cfg, check_input=True)
    except ValueError as error:  # a bad model / layer / option: one line, no traceback
        raise SystemExit(f"convnn-profile: {error}") from None
    result = profile_model(model, shape)
    record = {"model": cfg.model.name, "layer": cfg.layer.name, "data": cfg.data.name, **result}
    _print_table(record)
    print(json.dumps(record))

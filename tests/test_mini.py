"""``budget=mini`` and the mini reproduction sweeps (experiments/mini): composition, models, one tiny run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from convnn.models import build_model
from convnn.report.claims import MINI, make_claims
from convnn.report.tables import compose_config, match_key, read_paper
from convnn.runs.records import read_record
from convnn.runs.sweep import expand_jobs
from convnn.train import app as train

ROOT = Path(__file__).resolve().parent.parent
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
PAPER = {r["row"]: r for table in MINI.tables for r in read_paper(table)}


def mini_jobs(table: str) -> list[list[str]]:
    """The jobs of ``experiments/mini/<table>.yaml``, each with its experiment override."""
    sweeper = OmegaConf.load(ROOT / "experiments" / "mini" / f"{table}.yaml").hydra.sweeper
    jobs = expand_jobs(dict(sweeper.rows), [f"{k}={v}" for k, v in sweeper.params.items()])
    return [[f"experiment=mini/{table}", *job] for job in jobs]


def test_mini_sweeps_are_the_kept_rows_times_three_seeds_and_match_the_paper_rows() -> None:
    """Every job's resolved config is what the tables compose for its paper row at budget=mini."""
    for table, row_ids in MINI.tables.items():
        jobs = mini_jobs(table)
        assert len(jobs) == 3 * len(row_ids)
        row_of_key = {
            match_key(compose_config((*shlex.split(PAPER[r]["overrides"]), "budget=mini"))): r
            for r in row_ids
        }
        covered: dict[str, list[str]] = {}
        for *job, seed in jobs:
            key = match_key(compose_config(tuple(job)))
            assert key in row_of_key, job
            covered.setdefault(row_of_key[key], []).append(seed)
        assert covered == {r: ["seed=0", "seed=1", "seed=2"] for r in row_ids}


def test_mini_budget_narrows_the_models_and_keeps_cifar_at_32() -> None:
    vgg = compose_config(("model=vgg11", "layer=branching", "budget=mini"))
    assert (vgg["model"]["width_mult"], vgg["model"]["hidden_features"]) == (0.25, 256)
    assert (vgg["optim"]["lr"], vgg["data"]["subset"]["train"]) == (3e-4, 25000)  # VGG's own mini recipe
    vit = compose_config(("model=vit_tiny", "layer=attention", "budget=mini"))
    vit_size = [vit["model"][k] for k in ("image_size", "patch_size", "dim", "depth", "mlp_dim")]
    assert vit_size == [32, 4, 128, 6, 512]
    assert (vit["optim"]["lr"], vit["data"]["subset"]["train"], vit["data"]["subset"]["test"]) == (
        1e-3,
        10000,
        2000,
    )
    assert (vgg["model"]["dropout"], vit["model"]["dropout"]) == (0.0, 0.1)  # no VGG classifier dropout
    assert vgg["data"]["image_size"] == vit["data"]["image_size"] == 32
    assert vgg["layer"] == compose_config(("model=vgg11", "layer=branching"))["layer"]  # the paper's knobs
    full = compose_config(("model=vit_tiny", "layer=attention"))["model"]
    assert (full["image_size"], full["patch_size"], full["dim"]) == (224, 16, 192)  # other budgets untouched


def test_every_mini_configuration_builds_and_runs_at_32x32() -> None:
    seen = set()
    for table in MINI.tables:
        for job in mini_jobs(table):
            cfg = compose_config(tuple(job[:-1]))
            key = match_key(cfg)
            if key in seen:
                continue
            seen.add(key)
            model = build_model(cfg["model"], cfg["layer"], 10, 32, 3).eval()
            with torch.no_grad():
                assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(seen) == sum(len(ids) for ids in MINI.tables.values())


@pytest.mark.skipif(not (CIFAR10 / "train").is_dir(), reason=f"offline CIFAR-10 copy not found at {CIFAR10}")
def test_one_tiny_mini_job_trains_and_reaches_the_mini_tables(tmp_path: Path, monkeypatch) -> None:
    """A mini Table 1 job (λ = 0.5) on real CIFAR-10, shrunk to 64 images, end to end into claims=mini."""
    tiny = ["data.subset.train=64", "data.subset.test=32", "epochs=1", "data.num_workers=0"]
    argv = ["convnn-train", f"out_dir={tmp_path}", "experiment=mini/table1", "layer.ratio=0.5", "seed=0"]
    argv += [f"data.root={CIFAR10}", "trainer.progress_bar=none", "logger=none", *tiny]
    monkeypatch.setattr(sys, "argv", argv)
    train.main()
    [path] = tmp_path.rglob("results.json")
    record = read_record(path)
    assert (record["status"], record["budget"], record["experiment"]) == ("finished", "mini", "mini/table1")
    assert path.is_relative_to(tmp_path / "mini" / "table1")
    cfg = record["config"]
    assert (cfg["model"]["width_mult"], cfg["optim"]["lr"], cfg["scheduler"]["name"]) == (
        0.25,
        3e-4,
        "cosine",
    )
    assert not list(path.parent.rglob("*.ckpt"))  # the mini budget keeps no checkpoint
    make_claims("mini", str(tmp_path), tmp_path / "out")
    table1 = (tmp_path / "out" / "table1-cifar10.md").read_text()
    assert "| t1.c10.features.r0.500 | cifar10 | without_pe | lambda=0.500 | 1 of 1 |" in table1
    assert "1 records read, 1 matched to paper rows" in table1

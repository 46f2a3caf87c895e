"""The paper experiments: each expands to the paper's grid, covers every paper row, and composes."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from convnn.report.tables import read_paper
from convnn.runs.sweep import expand_jobs, override_key

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments" / "paper"
PAPER = ROOT / "results" / "paper"

# Grid sizes from the paper (Sec. 6, 11-15; project page), three seeds each.
JOBS = {
    "table1": 9 * 2 * 2 * 3,  # lambda x positional encoding x dataset x seed
    "table2": 8 * 2 * 3,  # attention variants x dataset x seed
    "table3": 9 * 2 * 3,
    "table4": 5 * 2 * 3,  # Conv2D p=1, branching / ConvNN x p in {1, 2}
    "table5": 4 * 2 * 3,  # attention, D, DS, R
    "fig4": (12 * 3 + 3) * 2 * 3,  # k in 1..12 x conv kernel 1..3, Conv2D kernel 1..3
    "fig5": (2 * 2 * 15 + 2 + 1)
    * 2
    * 3,  # lambda 0.5 / 1 x random / spatial x r in 4..32 step 2, all; Conv2D
    "fig7": (11 + 11 + 12 + 1) * 2 * 3,  # ConvNN all / random x k in 2..12, KVT k in 2..12 + 100, attention
    "fig8": (2 * 12 + 2) * 2 * 3,  # random / spatial x r in 16..192 step 16, all, attention
    "fig10": 3 * 3 * 2 * 3,  # lambda in {0, 0.5, 1} x lr x dataset x seed
    "resnet50": 5 * 3,
}
TABLE_CSV = {"table1", "table2", "table3", "table4", "table5", "resnet50"}


def experiment_jobs(name: str) -> tuple[dict[str, str], list[list[str]]]:
    """The experiment's group choices from its defaults list (and the ``model.*`` values it sets for
    every job, e.g. the reference's initialisation), and its jobs."""
    cfg = OmegaConf.load(EXPERIMENTS / f"{name}.yaml")
    defaults = {f"model.{key}": str(value) for key, value in cfg.get("model", {}).items()}
    for entry in cfg.defaults:
        ((key, value),) = entry.items()
        defaults[key.removeprefix("override /")] = value
    sweeper = cfg.hydra.sweeper
    params = [f"{k}={v}" for k, v in sweeper.params.items()]
    return defaults, expand_jobs(dict(sweeper.rows), params)


def _value(text: str) -> object:
    """An override value as Hydra would read it (numbers and booleans compared by value)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def effective(defaults: dict[str, str], overrides: list[str]) -> dict[str, object]:
    """The model / data / layer choices and options a job (or a paper row) sets, seed left out."""
    out: dict[str, object] = {
        k: _value(v) for k, v in defaults.items() if k in ("model", "data", "layer") or k.startswith("model.")
    }
    for o in overrides:
        key = override_key(o)
        if key not in ("seed", "resume"):
            out[key] = _value(o.split("=", 1)[1])
    return out


def test_every_paper_artefact_has_an_experiment() -> None:
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")) == sorted(JOBS)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_experiment_expands_to_the_paper_grid(name: str) -> None:
    defaults, jobs = experiment_jobs(name)
    assert defaults["hydra/sweeper"] == "paper"
    assert len(jobs) == JOBS[name]
    assert len({frozenset(j) for j in jobs}) == len(jobs)
    assert {o for j in jobs for o in j if o.startswith("seed=")} == {"seed=0", "seed=1", "seed=2"}


@pytest.mark.parametrize("name", sorted(TABLE_CSV))
def test_every_paper_row_is_a_job_of_its_experiment(name: str) -> None:
    defaults, jobs = experiment_jobs(name)
    produced = [effective(defaults, job) for job in jobs]
    rows = read_paper(name)
    for row in rows:
        wanted = effective({}, shlex.split(row["overrides"]))
        assert wanted in produced, f"{row['row']} ({row['overrides']}) is not a job of experiment {name}"
    assert len({json_key(effective({}, shlex.split(r["overrides"]))) for r in rows}) == len(rows)


def json_key(d: dict[str, object]) -> str:
    return repr(sorted(d.items()))


def test_table1_grid_is_lambda_by_positional_encoding_by_dataset() -> None:
    _, jobs = experiment_jobs("table1")
    cells = {(o["layer.ratio"], o["layer.select_by"], o["data"]) for o in (effective({}, j) for j in jobs)}
    ratios = {i / 8 for i in range(9)}
    assert cells == {(r, s, d) for r in ratios for s in ("features", "both") for d in ("cifar10", "cifar100")}


def test_dry_run_lists_the_jobs_and_launches_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "convnn-train",
            "-m",
            "experiment=paper/table4",
            "hydra.sweeper.dry_run=true",
            f"out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "30 jobs to launch"
    assert len(lines) == 32 and lines[-1].startswith("projected cost: 30 jobs x 150 epochs: ")
    assert "layer.ratio=0.5 layer.patch=2 data=cifar100 seed=2" in result.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_job_of_every_experiment_composes(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "convnn-train",
            "-m",
            f"experiment=paper/{name}",
            "hydra.sweeper.dry_run=true",
            f"out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == f"{JOBS[name]} jobs to launch"


SHRINK = {  # narrow networks so every configuration can be built and run quickly
    "vgg11": {"width_mult": 0.125, "hidden_features": 16},
    "vit_tiny": {"dim": 32, "depth": 1, "mlp_dim": 64},
    "resnet50": {"base_width": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_configuration_of_every_experiment_builds_and_runs(name: str) -> None:
    """Each distinct model x layer of the sweep (narrowed, at the data's real image size) runs forward."""
    import torch

    from convnn.models import build_model, input_size
    from convnn.report.tables import compose_config

    _, jobs = experiment_jobs(name)
    seen = set()
    for job in jobs:
        if "seed=0" not in job:
            continue
        cfg = compose_config((f"experiment=paper/{name}", *job))
        model_cfg = {**cfg["model"], **SHRINK[cfg["model"]["name"]]}
        key = repr((model_cfg, cfg["layer"], cfg["data"]["num_classes"]))
        if key in seen:
            continue
        seen.add(key)
        size = input_size(model_cfg, cfg["data"]["image_size"])
        model = build_model(model_cfg, cfg["layer"], cfg["data"]["num_classes"], size).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
        assert out.shape == (1, cfg["data"]["num_classes"]), job

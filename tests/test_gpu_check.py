"""``make gpu-check`` (scripts/gpu_check.py) through its CPU paths: the dry run's plan and budgets, the
one-line list of a bare machine's missing pieces, the short trainings' configs (they must match a row
of the authors' logs), and (slow) one short training end to end on the CPU in the GPU's place."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convnn.runs.cost import cost_key, reference
from convnn.train.config import validate_config
from tests.test_configs import compose_train
from tests.test_results import PROVENANCE, header_line

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

EIGHT_MINUTES_S = 8 * 60


def test_dry_run_lists_every_part_within_eight_minutes_and_runs_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    parts = [line.split()[:2] for line in lines if not line.startswith((" ", "total"))]
    assert [name for name, _ in parts] == ["tests", "bench", "table1", "table2"]
    assert sum(int(budget) for _, budget in parts) == gpu_check.TOTAL_BUDGET_S <= EIGHT_MINUTES_S - 10
    commands = [line.strip() for line in lines if line.startswith(" ")]
    assert commands[0].endswith("-m pytest -q -m cuda")
    assert "scripts/bench_layers.py --device cuda --batch 256" in commands[1]
    assert all("trainer=gpu" in c and "epochs=2" in c for c in commands[2:])
    assert "gpu-check-cuda" not in {p.stem for p in (tmp_path).rglob("*")}  # nothing written
    if not torch.cuda.is_available():
        missing = [line for line in result.stderr.splitlines() if "no CUDA device" in line]
        assert len(missing) == 1 and missing[0].startswith("gpu-check: no CUDA device: torch ")
        assert missing[0].endswith("this check needs one GPU")


def test_a_bare_machine_gets_one_line_per_missing_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def problem(module: str) -> str | None:
        if module in ("hydra", "fvcore", "pytest"):
            return f"ModuleNotFoundError: No module named '{module}'"
        return None

    monkeypatch.setattr(gpu_check, "_import_problem", problem)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    fatal, notes = gpu_check.missing_pieces(tmp_path / "cifar10")
    assert fatal[:2] == [
        "missing Python package hydra-core (ModuleNotFoundError: No module named 'hydra'; pip install "
        "hydra-core, or carry its wheel)",
        "missing Python package fvcore (ModuleNotFoundError: No module named 'fvcore'; pip install fvcore, "
        "or carry its wheel)",
    ]
    assert (len(fatal) == 3) != torch.cuda.is_available()  # no CUDA: the third line
    assert notes[0] == "no pytest (pip install pytest): the CUDA tests are skipped"
    assert notes[1].startswith("no C++ compiler (c++ / g++ on PATH)")
    assert notes[2].startswith(f"no CIFAR-10 at {tmp_path / 'cifar10'} (set CONVNN_DATA_ROOT)")
    assert all("\n" not in line for line in fatal + notes)


@pytest.mark.parametrize("row", sorted(gpu_check.ROWS))
@pytest.mark.parametrize("real_data", [True, False])
def test_the_short_trainings_are_the_papers_rows_on_a_subset(
    row: str, real_data: bool, tmp_path: Path
) -> None:
    """Valid configs at the paper's batch and backbone, whose cost key has an exact authors' epoch time
    (the row the projection is set against); synthetic images where no CIFAR-10 is found."""
    data_root = Path("/work/shared/data/cifar10") if real_data else tmp_path / "absent"
    if real_data and not gpu_check._is_cifar10(data_root):
        pytest.skip("needs the offline CIFAR-10 copy")
    overrides = gpu_check.training_overrides(row, tmp_path, data_root)
    cfg, _ = compose_train(*overrides)
    typed = validate_config(cfg)
    assert (typed.trainer.accelerator, typed.epochs, typed.batch_size) == ("gpu", 2, 256)
    assert typed.data.name == ("cifar10" if real_data else "synthetic")
    images = typed.data.subset.train if real_data else typed.data.train_size
    assert images == 256 * gpu_check.STEPS[row]
    paper_data = {**dict(cfg), "data": {**dict(cfg.data), "name": "cifar10"}}  # synthetic stands in for it
    found = reference(cost_key(paper_data))
    assert found is not None and found[1], "no exact authors' row to set the projection against"


@pytest.mark.slow
def test_one_short_training_end_to_end_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Table 1 part with a narrow conv-only VGG-11 on the CPU instead of the GPU: the part runs
    through the convnn-train wrapper, its record becomes a results row, and the results files name the
    device."""
    monkeypatch.setattr(gpu_check, "ON_GPU", "trainer=cpu")
    monkeypatch.setattr(gpu_check, "STEPS", {"table1": 1, "table2": 1})
    name, overrides = gpu_check.ROWS["table1"]
    tiny = [
        "experiment=paper/table1",
        "layer.ratio=0.0",
        "model.width_mult=0.0625",
        "model.hidden_features=16",
    ]
    monkeypatch.setitem(gpu_check.ROWS, "table1", (name, tiny))
    monkeypatch.setattr(gpu_check, "OUT", tmp_path / "bench")
    part = next(p for p in gpu_check.plan(tmp_path, tmp_path / "absent") if p.name == "table1")
    part.budget_s = 600
    result = gpu_check.run_part(part)
    assert result["status"] == "passed", result["output_tail"]
    row = gpu_check.training_row("table1", tmp_path, "cpu (test)")
    assert row is not None and row["steps"] == 2 and row["images_per_s"] > 0
    assert row["projected_epoch_s"] == pytest.approx(50_000 / row["images_per_s"], rel=0.01)  # both rounded
    assert row["key"] is None and row["authors_epoch_s"] is None  # a narrow VGG: no authors' row
    assert row["data"] == "synthetic"  # no CIFAR-10 given: CIFAR's shape
    assert row["peak_reserved_mib"] is None  # no CUDA: no allocator peaks
    machine = {
        "device": "cpu (test)",
        "torch": torch.__version__,
        "cuda": None,
        "python": "3",
        "date": "today",
    }
    gpu_check.write_results(machine, [result], [row], ["a note"])
    report = json.loads((tmp_path / "bench" / "train-cuda.json").read_text())
    assert report["device"] == "cpu (test)" and report["rows"][0]["row"] == "table1"
    assert "# GPU check: cpu (test)" in (tmp_path / "bench" / "gpu-check-cuda.md").read_text()


def test_the_results_files_say_how_they_were_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu-check-cuda.* and train-cuda.* carry the Made-by line every file under results/ has, with
    the GPU's name as the machine."""
    monkeypatch.setattr(gpu_check, "OUT", tmp_path)
    machine = {"device": "NVIDIA H100 80GB HBM3", "torch": "2", "cuda": "13", "python": "3", "date": "today"}
    part = {"what": "bench", "status": "passed", "seconds": 1.0, "budget_s": 10}
    row = {
        "what": "Table 1",
        "data": "cifar10",
        "steps": 200,
        "images_per_s": 5000.0,
        "projected_epoch_s": 10.0,
        "authors_epoch_s": 15.2,
        "vs_authors": 0.66,
        "peak_allocated_mib": 900.0,
        "peak_reserved_mib": 1000.0,
    }
    gpu_check.write_results(machine, [part], [row], ["a note"])
    for name in ("gpu-check-cuda", "train-cuda"):
        for suffix in (".md", ".json"):
            line = header_line(tmp_path / f"{name}{suffix}")
            assert line is not None and PROVENANCE.match(line), (name, suffix, line)
            assert " on NVIDIA H100 80GB HBM3, " in line

"""``pip install .`` (non-editable) ships the configs, the experiments and the paper CSVs: the
installed commands work from any directory, without the source tree."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__")


def SKIP(directory: str, names: list[str]) -> set[str]:
    """What the source copy leaves out: build and run outputs at the top only (convnn/runs/ is code)."""
    top = {".venv", ".git", "runs", "build", "results"} if Path(directory) == ROOT else set()
    return set(ANYWHERE(directory, names)) | (top & set(names))


@pytest.mark.slow
def test_a_non_editable_install_runs_from_anywhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")  # torch & co.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    shutil.copytree(ROOT / "results" / "paper", src / "results" / "paper")
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(src)], capture_output=True, text=True
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)  # nothing may come from the source tree any more
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*cmd: str) -> str:
        done = subprocess.run(
            [str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=work, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run(
        "python", "-c", "import convnn.paths as p; print(p.CONFIG_DIR, p.EXPERIMENTS_DIR, p.PAPER_DIR)"
    )
    assert where.count(str(site / "convnn" / "_data")) == 3
    logs = "from convnn.report.authors import read_runs, AUTHORS_DIR; print(len(read_runs()), AUTHORS_DIR)"
    assert run("python", "-c", logs).split() == ["444", str(site / "convnn" / "_data" / "paper" / "authors")]
    script = "from convnn.knn import native as n; print(n.SOURCE.is_file(), n.available())"
    kernel = run("python", "-c", script)
    assert kernel.split() == ["True", "True"]  # the C++ source ships and builds from the installed copy
    assert "name: branching" in run("convnn-train", "--cfg", "job", "experiment=quickstart")
    assert run("convnn-train", "-m", "experiment=paper/table2", "hydra.sweeper.dry_run=true").startswith(
        "48 jobs to launch"
    )
    assert "table4-cifar100.md" in run("convnn-tables", "table=table4", "dataset=cifar100")
    assert (work / "results" / "reproduced" / "table4-cifar100.md").is_file()
    assert '"params": 130015690' in run("convnn-profile", "layer=branching")

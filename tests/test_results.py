"""Committed results say how they were made, the writers say it the same way, and the licence and
citation files match the package."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from PIL import Image

import convnn
from convnn.provenance import MARK, code_state, cpu_name, made_by

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
# "Made by `<command>` (or: by hand from ...) at commit <hash> ... <date>"
PROVENANCE = re.compile(
    rf"^{MARK}.+ at (commit [0-9a-f]{{7,40}}|convnn \S+ \(no git checkout\)).* \d{{4}}-\d\d-\d\d"
)


def header_line(path: Path) -> str | None:
    """The Made-by line of a result file: a Markdown line near the top, the first ``#`` / ``%`` line
    of a CSV / LaTeX file, ``made_by`` of a JSON object, the ``Description`` of a PNG."""
    if path.suffix == ".md":
        return next((line for line in path.read_text().splitlines()[:6] if line.startswith(MARK)), None)
    if path.suffix in (".csv", ".tex"):
        first = path.read_text().splitlines()[0]
        comment = "# " if path.suffix == ".csv" else "% "
        return first.removeprefix(comment) if first.startswith(comment) else None
    if path.suffix == ".json":
        return json.loads(path.read_text()).get("made_by")
    if path.suffix == ".png":
        with Image.open(path) as image:
            return image.info.get("Description")
    return None


# a run record (results.json, as exported into results/reproduced/<runs>/records/) says how it was made
# in its own fields: the overrides, the commit, the device and the start time
RECORD_PROVENANCE = ("overrides", "git_commit", "device", "started_at")


def missing_provenance(record: dict) -> list[str]:
    """The fields of :data:`RECORD_PROVENANCE` a run record lacks (``overrides`` may be empty)."""
    return [k for k in RECORD_PROVENANCE if record.get(k) is None or (k != "overrides" and not record[k])]


def test_a_record_without_its_commit_is_caught() -> None:
    record = {"overrides": [], "git_commit": "1a2b3c4", "device": "cpu (x86_64)", "started_at": "2026-12-07"}
    assert missing_provenance(record) == []
    broken = {**record, "git_commit": None, "overrides": None}
    assert missing_provenance(broken) == ["overrides", "git_commit"]


# copied unchanged from elsewhere (a header would change them): their folder's README names the source
COPIED = {RESULTS / "paper" / "authors" / name for name in ("curves.csv", "runs.csv")}
# written before the header line existed, with the command that rewrites each (then drop it here)
RESULT_FILES = sorted(
    p for p in RESULTS.rglob("*") if p.is_file() and p.name != "README.md" and p not in COPIED
)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(RESULTS))) for p in RESULT_FILES],
)
def test_every_result_file_says_how_it_was_made(path: Path) -> None:
    """README.md files are indexes written by hand; every other file under results/ has a header line
    with its command (or how it was typed in), the commit, the machine and the date."""
    if path.name == "results.json":
        assert not missing_provenance(json.loads(path.read_text())), path.relative_to(ROOT)
        return
    line = header_line(path)
    assert line is not None, f"{path.relative_to(ROOT)} has no '{MARK}...' header line"
    assert PROVENANCE.match(line), line


@pytest.mark.parametrize("path", sorted(COPIED), ids=lambda p: str(p.relative_to(RESULTS)))
def test_copied_files_name_their_source(path: Path) -> None:
    """A file copied unchanged is named in its folder's README with the repositories and commits it
    was copied from."""
    readme = (path.parent / "README.md").read_text()
    assert f"`{path.name}`" in readme
    assert len(re.findall(r"\b[0-9a-f]{40}\b", readme)) >= 1 and "repository" in readme


def test_the_header_line_names_command_commit_machine_and_date() -> None:
    line = made_by("convnn-tables table=table1", machine="NVIDIA H100 80GB HBM3")
    assert PROVENANCE.match(line)
    assert line.startswith("Made by `convnn-tables table=table1` at ")
    assert " on NVIDIA H100 80GB HBM3, " in line
    assert f" at {code_state()} on " in line and re.fullmatch(r".+ \(\d+ cores\)", cpu_name())
    assert made_by("x").split(" on ")[1].startswith(cpu_name())


def test_the_smoke_table_is_gone() -> None:
    """The chance-level budget=smoke Table 1 (a pipeline check that read as a failed reproduction)."""
    assert not list((RESULTS / "reproduced").glob("table1-cifar10.*"))
    assert not (RESULTS / "reproduced" / "fig3.png").exists()


def test_license_and_citation_match_the_package() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 The convnn authors" in license_text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    assert cff["title"] == project["name"] and cff["version"] == project["version"] == convnn.__version__
    paper = cff["preferred-citation"]
    assert paper["title"] == "Attention Via Convolutional Nearest Neighbors" and paper["year"] == 2025
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == [
        ("Kang", "Mingi"),
        ("Rocha Neto", "Jeová Farias Sales"),
    ]
    assert "2511.14137" in paper["url"]

"""``convnn-tables export=``: a runs folder's records copied into a reproduction without machine paths,
and the same tables and claims regenerated from the copy."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest

from convnn.report.cli import main
from convnn.report.export import export_records
from convnn.report.tables import compose_config, make_table, read_paper
from convnn.runs.records import write_record

ROWS = {r["row"]: r for r in read_paper("table1")}


def machine_record(runs: Path, name: str, row_id: str, seed: int, acc: float, data_root: Path) -> Path:
    """A finished mini record of ``row_id`` as a machine writes it: absolute run_dir, data.root, logs."""
    config = compose_config((*shlex.split(ROWS[row_id]["overrides"]), "budget=mini"))
    config = {**config, "data": {**config["data"], "root": str(data_root)}, "epochs": 3, "out_dir": "runs"}
    run_dir = runs / "table1" / name
    epochs = [{"epoch": e, "test_loss": 2.0 - e / 10, "test_acc1": acc - 3 + e} for e in (1, 2, 3)]
    write_record(
        run_dir / "results.json",
        {
            "status": "finished",
            "config": config,
            "overrides": [f"data.root={data_root}", "experiment=mini/table1", f"seed={seed}"],
            "run_dir": str(run_dir),
            "launcher": {"log": str(runs / "table1" / ".submitit" / "7_0" / "7_0_0_log.out")},
            "error": "earlier attempt: File /usr/lib/python3.11/site.py line 1; see https://x.org/a/b",
            "seed": seed,
            "budget": "mini",
            "device": "cpu (x86_64, 1 threads)",
            "epochs": epochs,
            "final": {"test_loss": 1.7, "test_acc1": acc},
            "best": {"epoch": 3, "test_loss": 1.7, "test_acc1": acc},
        },
    )
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "machine" / "runs" / "mini"
    for seed in range(2):
        for row_id, acc in (("t1.c10.features.conv2d", 60.0), ("t1.c10.features.r0.500", 55.0)):
            machine_record(
                root, f"{row_id},seed={seed}", row_id, seed, acc + seed, tmp_path / "data" / "cifar10"
            )
    return root


def test_export_copies_records_only_without_machine_paths(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo" / "results" / "reproduced" / "mini" / "records"
    written = export_records(runs, out)
    assert len(written) == 4 and sorted(p.name for p in out.rglob("*") if p.is_file()) == ["results.json"] * 4
    for path in written:
        text = path.read_text()
        assert str(tmp_path) not in text and "/usr/lib" not in text
        record = json.loads(text)
        assert record["run_dir"] == path.parent.relative_to(out).as_posix()
        assert record["config"]["data"]["root"] == "<data root>"
        assert record["overrides"][0] == "data.root=<data root>"
        assert record["launcher"]["log"] == "<runs>/table1/.submitit/7_0/7_0_0_log.out"
        assert record["error"] == "earlier attempt: File <path> line 1; see https://x.org/a/b"
        assert record["config"]["out_dir"] == "runs" and record["overrides"][1] == "experiment=mini/table1"
    assert export_records(runs, out) == written  # again: the same copies


def test_tables_and_claims_regenerate_the_same_from_the_copy(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    main([f"export={runs}"])  # default: results/reproduced/<runs folder's name>/records
    records = Path("results/reproduced/mini/records")
    assert len(list(records.rglob("results.json"))) == 4

    def body(source: str, out: str) -> tuple[list[dict], list[str]]:
        ids = ["t1.c10.features.conv2d", "t1.c10.features.r0.500"]
        (md, csv_path, _) = make_table("table1", source, Path(out), "mini", dataset="cifar10", row_ids=ids)
        with open(csv_path) as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
        return rows, [line for line in md.read_text().splitlines() if line.startswith("| ")]

    assert body(str(runs), "from-runs") == body(str(records), "from-copy")
    header = Path("from-copy/table1-cifar10.md").read_text().splitlines()[2]
    assert "source=results/reproduced/mini/records budget=mini" in header
    header = Path("from-runs/table1-cifar10.md").read_text().splitlines()[2]  # an absolute source: relative
    assert f"source={Path('..') / 'machine' / 'runs' / 'mini'} budget=mini" in header

    main(["claims=mini", f"source={records}", "out=results/reproduced/mini"])
    claims = Path("results/reproduced/mini/claims.md").read_text()
    assert "`convnn-tables claims=mini source=results/reproduced/mini/records`" in claims
    for path in Path("results/reproduced/mini").glob("*.*"):
        if path.suffix in (".md", ".csv", ".tex"):
            assert str(tmp_path) not in path.read_text(), path


def test_export_refuses_a_folder_with_other_runs_and_a_missing_source(
    runs: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "records"
    write_record(out / "gone" / "results.json", {"status": "finished"})
    with pytest.raises(ValueError, match=r"holds 1 records of runs not in .* \(e.g. gone/results.json\)"):
        export_records(runs, out)
    assert not (out / "table1").exists()  # nothing written
    with pytest.raises(SystemExit):
        main([f"export={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory of runs" in err

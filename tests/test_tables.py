"""convnn-tables and figures from hand-made run records: matching, seed statistics, missing cells."""

from __future__ import annotations

import csv
import shlex
import statistics
from pathlib import Path

import pytest

from convnn.provenance import code_state
from convnn.report.cli import main, parse_args
from convnn.report.figures import FIGURES, draw_figure, make_figure, smooth, sweep_points
from convnn.report.tables import (
    TABLES,
    build_table,
    compose_config,
    display_source,
    make_table,
    match_records,
    read_paper,
    select_budget,
)
from convnn.runs.records import write_record

ROWS = {r["row"]: r for r in read_paper("table4")}


def config_of(row_id: str, *extra: str) -> dict:
    """A resolved config as training records it, for paper row ``row_id`` (plus ``extra`` overrides)."""
    cfg = compose_config((*shlex.split(ROWS[row_id]["overrides"]), "budget=smoke", *extra))
    data = {**cfg["data"], "subset": {"train": 1024, "test": 512, "seed": 0}}
    return {**cfg, "data": data, "epochs": 2, "batch_size": 32}


def record(
    row_id: str, seed: int, acc: float, loss: float, best: float, status: str = "finished", **kw
) -> dict:
    epochs = [
        {"epoch": 1, "train_loss": loss + 1, "test_loss": loss + 0.5, "test_acc1": best},
        {"epoch": 2, "train_loss": loss + 0.5, "test_loss": loss, "test_acc1": acc},
    ]
    return {
        "status": status,
        "config": kw.pop("config", None) or config_of(row_id),
        "seed": seed,
        "budget": "smoke",
        "device": "cpu",
        "params": 130_015_690,
        "gflops": 0.2,
        "gflops_profiler": 0.325,
        "epochs": epochs,
        "final": {"test_loss": loss, "test_acc1": acc, "test_acc5": 99.0},
        "best": {"epoch": 1, "test_loss": loss + 0.5, "test_acc1": best},
        **kw,
    }


@pytest.fixture
def records() -> list[dict]:
    return [
        record("t4.c10.branching.p1", 0, 80.0, 1.0, 81.0),
        record("t4.c10.branching.p1", 1, 81.0, 1.1, 82.0),
        record("t4.c10.branching.p1", 2, 82.0, 1.2, 83.0),
        record("t4.c10.conv2d.p1", 0, 79.5, 1.4, 79.5),
        record("t4.c10.convnn.p2", 0, 50.0, 2.0, 50.0, status="running"),
        # a configuration of no Table 4 row (k = 5): must not be counted anywhere
        record(
            "t4.c10.branching.p1", 0, 10.0, 9.0, 10.0, config=config_of("t4.c10.branching.p1", "layer.k=5")
        ),
    ]


def test_paper_csvs_have_one_schema_and_unique_rows() -> None:
    ids = []
    for table in TABLES:
        rows = read_paper(table)
        assert rows and set(rows[0]) == {
            "row", "table", "block", "dataset", "layer_type", "overrides",
            "test_loss", "test_acc1", "gflops", "params_m", "authors_run", "note",
        }  # fmt: skip
        ids += [r["row"] for r in rows]
        assert all(float(r["test_acc1"]) > 0 and r["overrides"] for r in rows)
    assert len(ids) == len(set(ids)) == 36 + 16 + 18 + 10 + 8 + 5
    row = {r["row"]: r for r in read_paper("table1")}["t1.c10.both.r0.375"]
    assert (row["test_loss"], row["test_acc1"], row["gflops"]) == ("1.386", "82.08", "0.331")


def test_records_match_rows_by_config_and_average_over_seeds(records: list[dict]) -> None:
    rows = list(ROWS.values())
    matched, unmatched = match_records(rows, records)
    assert [len(matched[r]) for r in ROWS] == [1, 3, 0, 0, 1, 0, 0, 0, 0, 0]
    assert [r["config"]["layer"]["k"] for r in unmatched] == [5]
    lines = {line["row"]: line for line in build_table(rows, matched)}
    branching = lines["t4.c10.branching.p1"]
    assert branching["n"] == 3
    assert branching["test_acc1_mean"] == pytest.approx(81.0)
    assert branching["test_acc1_std"] == pytest.approx(statistics.stdev([80.0, 81.0, 82.0]))
    assert branching["test_loss_mean"] == pytest.approx(1.1)
    assert branching["best_acc1_mean"] == pytest.approx(82.0)
    assert branching["paper_test_acc1"] == 81.26
    assert branching["diff_test_acc1"] == pytest.approx(81.0 - 81.26)
    conv = lines["t4.c10.conv2d.p1"]
    assert (conv["n"], conv["test_acc1_mean"], conv["test_acc1_std"]) == (1, 79.5, None)
    died = lines["t4.c10.convnn.p2"]
    assert (died["n"], died["incomplete"], died["test_acc1_mean"], died["diff_test_acc1"]) == (
        0,
        1,
        None,
        None,
    )
    assert died["paper_test_acc1"] == 60.32


def test_paper_is_compared_with_the_per_batch_mean_where_runs_recorded_it(records: list[dict]) -> None:
    batched = [
        dict(r, final={**r["final"], "test_acc1_batchmean": r["final"]["test_acc1"] + 0.2}) for r in records
    ]
    rows = list(ROWS.values())
    lines = {line["row"]: line for line in build_table(rows, match_records(rows, batched)[0])}
    branching = lines["t4.c10.branching.p1"]
    assert branching["test_acc1_mean"] == pytest.approx(81.0)
    assert branching["test_acc1_batchmean_mean"] == pytest.approx(81.2)
    assert branching["diff_test_acc1"] == pytest.approx(81.2 - 81.26)  # the comparable average
    mixed = [batched[0], *records[1:3]]  # one seed without the field: no batch mean, per image compared
    line = build_table(rows, match_records(rows, mixed)[0])[1]
    assert line["test_acc1_batchmean_mean"] is None and line["diff_test_acc1"] == pytest.approx(81.0 - 81.26)


def test_written_table_shows_missing_cells_paper_and_budget(records: list[dict], tmp_path: Path) -> None:
    source = tmp_path / "runs"
    for i, r in enumerate(records):
        write_record(source / f"run{i}" / "results.json", r)
    md, csv_path, tex = make_table("table4", str(source), tmp_path / "out")
    text = md.read_text()
    assert "budget=smoke (epochs=2, batch=32, train subset=1024, test subset=512, device=cpu)" in text
    assert (
        "6 records read, 5 matched to paper rows (1 of them not finished, 0 diverged), 1 unmatched; "
        "2 of 10 rows have finished runs" in text
    )
    line = next(x for x in text.splitlines() if x.startswith("| t4.c10.branching.p1 "))
    expected = "| 3 of 3 | 1.100 ± 0.100 | 81.00 ± 1.00 | missing | 82.00 ± 1.00 | 1.424 | 81.26 | -0.26 |"
    assert expected in line
    assert line.endswith("| same values as Table 1 (without positional encoding) |")  # the paper's note
    missing = next(x for x in text.splitlines() if x.startswith("| t4.c100.convnn.p2 "))
    assert missing.count("missing") == 13 and "28.17" in missing  # 5 of them at the matched epoch
    with open(csv_path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert len(rows) == 10
    assert rows[3]["test_acc1_mean"] == "" and rows[3]["paper_test_acc1"] == "54.0"
    assert r"81.00 $\pm$ 1.00" in tex.read_text()
    made = f"Made by `convnn-tables table=table4 source={display_source(str(source))}` at {code_state()} on "
    assert text.splitlines()[2].startswith(made)  # the line under the title
    assert csv_path.read_text().startswith(f"# {made}") and tex.read_text().startswith(f"% {made}")


def test_one_dataset_half_with_a_note_and_no_runs(tmp_path: Path) -> None:
    (md, _, _) = make_table("table4", None, tmp_path, dataset="cifar100", note="nothing was run")
    assert md.name == "table4-cifar100.md"
    text = md.read_text()
    assert "Note: nothing was run" in text and "0 of 5 rows have finished runs" in text
    assert "t4.c10." not in text
    with pytest.raises(ValueError, match="no rows for dataset 'cifar1000'"):
        make_table("table4", None, tmp_path, dataset="cifar1000")


def test_mixed_setups_must_be_chosen_whatever_their_label(records: list[dict]) -> None:
    full = {**records[0], "budget": "full", "config": {**records[0]["config"], "epochs": 150}}
    with pytest.raises(
        ValueError, match=r"mix 2 setups: .*budget=(full|smoke): epochs=(150|2).*pick one with setup="
    ):
        select_budget([*records, full], None)
    assert select_budget([*records, full], "full") == [full]
    # same label, another budget: `budget=smoke epochs=5` is not mixed into the smoke cells
    five = {**records[0], "config": {**records[0]["config"], "epochs": 5}}
    with pytest.raises(ValueError, match=r"setup=\w{8} \(budget=smoke: epochs=5; 1 runs\)") as e:
        select_budget([*records, five], "smoke")
    key = str(e.value).split("setup=")[1].split(" ")[0]
    assert select_budget([*records, five], "smoke", key) in ([five], records)
    for other in ("optim.weight_decay", "data.augment", "trainer.precision"):
        section, leaf = other.split(".")
        changed = {
            **records[1],
            "config": {**records[1]["config"], section: {**records[1]["config"].get(section, {}), leaf: "x"}},
        }
        with pytest.raises(ValueError, match=f"mix 2 setups.*{section}"):
            select_budget([*records, changed], None)
    with pytest.raises(
        ValueError, match=r"budget='smokee' matches no record; the records' budgets: \['smoke'\]"
    ):
        select_budget(records, "smokee")


def test_diverged_and_corrupt_runs_show_plainly(records: list[dict], tmp_path: Path, capsys) -> None:
    source = tmp_path / "runs"
    nan_run = record("t4.c10.branching.p1", 3, 0.0, 0.0, 0.0, status="diverged")
    nan_run["final"] = {"test_loss": None, "test_acc1": None, "test_acc5": None}
    for i, r in enumerate([*records, nan_run]):
        write_record(source / f"run{i}" / "results.json", r)
    (source / "broken").mkdir()
    (source / "broken" / "results.json").write_text('{"status": "fini')
    md, _, _ = make_table("table4", str(source), tmp_path / "out")
    err = capsys.readouterr().err
    assert (
        f"convnn-tables: warning: skipped {source / 'broken' / 'results.json'} is not a valid run record"
        in err
    )
    line = next(x for x in md.read_text().splitlines() if x.startswith("| t4.c10.branching.p1 "))
    assert "| 3 of 4, 1 diverged | 1.100 ± 0.100 | 81.00 ± 1.00 |" in line
    assert "0 diverged" not in md.read_text() and "1 diverged)" in md.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["table=table1", "sauce=runs"], "bad argument 'sauce=runs'"),
        (["source=runs"], "exactly one of table"),
        (["table=table1", "profile=yes"], "profile='yes'"),
    ],
)
def test_bad_arguments_are_rejected(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_help_and_wandb_without_credentials(capsys, monkeypatch, tmp_path: Path) -> None:
    main(["--help"])
    assert "convnn-tables table=table1" in capsys.readouterr().out
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as e:
        main(["table=table1", "source=wandb:me/convnn"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "run `wandb login` or set WANDB_API_KEY" in err


def test_default_output_is_the_working_directorys(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVNN_RUNS_DIR", raising=False)
    (tmp_path / "runs" / "paper" / "table4").mkdir(parents=True)  # the default source, no runs yet
    main(["table=table4", "dataset=cifar100"])
    assert (tmp_path / "results" / "reproduced" / "table4-cifar100.md").is_file()


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["table=table1", f"source={tmp_path / 'nowhere'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is neither a directory nor 'wandb:entity/project'" in err


def test_unknown_table_and_figure_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown table 'table9'"):
        read_paper("table9")
    with pytest.raises(ValueError, match="unknown figure 'fig99'"):
        make_figure("fig99", [], tmp_path)


def test_params_and_gflops_regenerate_without_training(tmp_path: Path) -> None:
    from convnn.report.tables import profile_rows

    row = {r["row"]: r for r in read_paper("table1")}["t1.c10.features.conv2d"]
    (stats,) = profile_rows([row]).values()
    assert stats["params"] == 130_015_690  # the paper's 130.015M (reference notes)
    assert stats["gflops_profiler"] == pytest.approx(0.293, abs=0.005)


def test_sweep_figure_points_cost_panel_and_png(tmp_path: Path) -> None:
    def at(r: int, sampling: str, seed: int, acc: float) -> dict:
        cfg = {
            "layer": {
                "ratio": 0.5,
                "sampling": sampling,
                "num_candidates": r * r,
            },  # the paper's r: r^2 candidates
            "data": {"name": "cifar10"},
        }
        return {
            "status": "finished",
            "config": cfg,
            "seed": seed,
            "budget": "smoke",
            "best": {"test_acc1": acc},
            "gflops": 0.1 * r,
            "gflops_profiler": 0.2 * r,
        }

    recs = [
        at(4, "random", 0, 70.0),
        at(4, "random", 1, 72.0),
        at(8, "random", 0, 75.0),
        at(8, "spatial", 0, 60.0),
    ]
    random_series = FIGURES["fig5"].series[0]
    assert random_series.label == "Branching (λ=0.5), random"
    assert sweep_points(recs, random_series) == [(4.0, 71.0, pytest.approx(2**0.5), 2), (8.0, 75.0, 0.0, 1)]
    assert sweep_points(recs, random_series, "gflops_profiler") == [
        (4.0, pytest.approx(0.8), 0.0, 2),
        (8.0, pytest.approx(1.6), 0.0, 1),
    ]
    assert FIGURES["fig5"].cost and FIGURES["fig8"].cost and not FIGURES["fig4"].cost
    path = make_figure("fig5", recs, tmp_path, "synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_row = make_figure("fig7", [], tmp_path, "synthetic")
    assert _png_size(path)[1] > 1.8 * _png_size(one_row)[1]  # the GFLOPs row below the accuracy row


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_loss_figure_and_smoothing(records: list[dict], tmp_path: Path) -> None:
    assert smooth([1.0, 2.0, 3.0], window=2) == [1.0, 1.5, 2.5]
    assert smooth([1.0, 2.0], window=2) == [1.0, 2.0]  # too short to smooth
    seeds = records[:3]  # Table 4's branching row, seeds 0-2 (the others would repeat seed 0 at λ = 0.5)
    for r in seeds:  # a new layer dict: the composed config is compose_config's cached one
        r["config"] = {**r["config"], "layer": {**r["config"]["layer"], "ratio": 0.5}}
    path = make_figure("fig3", seeds, tmp_path, "synthetic")
    assert path.name == "fig3.png" and path.stat().st_size > 10_000


def test_loss_figure_has_no_empty_legend_entries_and_shows_single_epochs() -> None:
    one_epoch = record("t4.c10.branching.p1", 0, 80.0, 1.0, 81.0)
    one_epoch["config"] = {**one_epoch["config"], "layer": {**one_epoch["config"]["layer"], "ratio": 0.5}}
    one_epoch["epochs"] = one_epoch["epochs"][:1]
    fig = draw_figure("fig3", [one_epoch], "synthetic")
    assert [ax.get_ylabel() for ax in fig.axes] == ["train loss", "test loss", "test top-1 (%)"]
    for ax in fig.axes:  # not Conv2D / ConvNN: no runs; ours and the authors' run, one point each
        assert ax.get_legend_handles_labels()[1] == ["Branching (λ=0.5)", "Branching (λ=0.5), authors"]
        assert [line.get_marker() for line in ax.get_lines()] == ["o", "o"]

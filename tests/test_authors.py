"""The authors' per-epoch logs as data: the paper rows' runs, their noise, and the matched-epoch columns
of tables, figures and claims (hand-made records; the authors' numbers read from the CSVs here)."""

from __future__ import annotations

import copy
import csv
import math
import re
import shlex
import statistics
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import pytest

from convnn.paths import PAPER_DIR
from convnn.report import claims
from convnn.report.authors import compare_at, curve, local_noise, noise, read_curves, read_runs, value_at
from convnn.report.claims import CONSISTENT, INCONCLUSIVE, INCONSISTENT, NOT_TESTABLE, Claim, held_from
from convnn.report.figures import FIGURES, authors_points, authors_run, draw_figure
from convnn.report.tables import (
    TABLES,
    at_epoch,
    build_table,
    compose_config,
    match_records,
    read_paper,
)

AUTHORS = PAPER_DIR / "authors"
# "<kind>: <what> X..., the run's log gives Y" in a paper row's note names a cell the log does not give
EXCEPTION = re.compile(
    r"(?:misprint|repeated cell): (test loss|accuracy|params|gflops) ([\d.]+)M?\b"
    r".*?the run's log gives ([\d.]+)"
)
COLUMN = {"test loss": "test_loss", "accuracy": "test_acc1", "params": "params_m", "gflops": "gflops"}


def _raw_curves() -> dict[str, list[dict[str, str]]]:
    """curves.csv read plainly, independent of the module under test."""
    with open(AUTHORS / "curves.csv", newline="") as f:
        out: dict[str, list[dict[str, str]]] = {}
        for row in csv.DictReader(f):
            out.setdefault(row["run"], []).append(row)
    return out


RAW = _raw_curves()


def truncated(value: str, like: str) -> str:
    """``value`` cut (not rounded) to the printed digits of ``like``, as the authors printed."""
    return str(Decimal(value).quantize(Decimal(like), rounding=ROUND_DOWN))


def test_every_table_row_names_one_authors_run_whose_epoch_150_gives_the_printed_digits() -> None:
    with open(AUTHORS / "runs.csv", newline="") as f:
        runs = {row["run"]: row for row in csv.DictReader(f)}
    checked = exceptions = 0
    for table in TABLES:
        for row in read_paper(table):
            if table == "resnet50":  # no logs of the ImageNet runs
                assert row["authors_run"] == ""
                continue
            run = row["authors_run"]
            assert run in runs and len(RAW[run]) == 150, row["row"]  # exactly one run, logged to the end
            last = RAW[run][-1]
            logged = {
                "test_loss": last["test_loss"],
                "test_acc1": last["test_acc1"],
                "params_m": runs[run]["params_m"],
                "gflops": runs[run]["gflops_profiler"],
            }
            named = {COLUMN[m[1]]: (m[2], m[3]) for m in EXCEPTION.finditer(row["note"])}
            for column, value in logged.items():
                if column in named:  # the note names what the paper printed and what the log gives
                    printed, log = named[column]
                    assert row[column] == printed and truncated(value, log) == log != printed, row["row"]
                    exceptions += 1
                else:
                    assert truncated(value, row[column]) == row[column], (row["row"], column, value)
                checked += 1
    assert checked == 4 * (36 + 16 + 18 + 10 + 8)
    # Table 1 with-PE λ = 0.125 acc, Table 2 / 5 attention loss, Table 4 params, 30 repeated GFLOPs cells
    assert exceptions == 1 + 2 + 1 + 30


def test_the_logs_are_complete_and_keep_their_notice() -> None:
    runs, curves = read_runs(), read_curves()
    assert len(runs) == len(curves) == len(RAW) == 444
    for name, run in runs.items():
        assert curves[name]["epoch"] == tuple(range(1, int(run["epochs_logged"]) + 1))
    notice = (AUTHORS / "README.md").read_text()
    for text in (
        "Copyright (c) 2024 and 2025 Mingi Kang",
        "Permission is hereby granted, free of charge",
        "mingikang31/Convolutional-Nearest-Neighbor ",
        "313f2a581fbe59da2d02149b92f7eef23e5160bc",
        "mingikang31/Convolutional-Nearest-Neighbor-Attention",
        "72fd88645c12e80a6f20720ccc0d4c6ba776bda3",
    ):
        assert text in notice


def test_value_at_an_epoch_and_bad_names() -> None:
    run = "Final_Output/BR_test_cos---/VGG11-CIFAR10/BranchingConvNN_All_K9_Col_Col_br0000_s42"
    assert value_at(run, 2, "test_acc1") == float(RAW[run][1]["test_acc1"]) == 68.1055  # the issue's epoch 2
    assert value_at(run, 151, "test_acc1") is None and value_at(run, 0, "test_acc1") is None
    with pytest.raises(ValueError, match="unknown metric 'test_acc'"):
        curve(run, "test_acc")
    with pytest.raises(ValueError, match="no authors' run 'nope'"):
        curve("nope", "test_acc1")


def test_noise_is_the_residual_std_of_a_local_quadratic_fit() -> None:
    quadratic = [2.0 + 0.5 * e - 0.01 * e * e for e in range(1, 21)]
    assert all(local_noise(quadratic, e) == pytest.approx(0.0, abs=1e-9) for e in range(1, 21))
    # ±1 alternating over epochs 1..7, fitted at epoch 4: by hand the quadratic fit is 5/21 - 2u²/21
    # (u = e - 4), residuals 16/21, -24/21 (x2), 24/21 (x2), -8/21 (x2): sqrt(2688/441 / (7 - 3))
    wiggle = [(-1.0) ** e for e in range(1, 8)]
    assert local_noise(wiggle, 4) == pytest.approx(math.sqrt(2688 / 441 / 4))
    # a trend changes nothing; epochs near the ends use the 7 epochs at that end
    trended = [w + q for w, q in zip(wiggle + wiggle[:3], quadratic, strict=False)]
    assert local_noise(trended, 4) == pytest.approx(math.sqrt(2688 / 441 / 4))
    assert local_noise(trended, 1) == local_noise(trended, 2) == local_noise(trended, 4)
    assert local_noise(trended, 10) == local_noise(trended, 7)
    assert local_noise(wiggle[:6], 3) is None and local_noise(wiggle, 8) is None


def test_noise_explains_the_difference_between_the_authors_repeated_runs() -> None:
    """The authors ran Conv2D, λ = 0.5 and ConvNN twice with the same arguments (Table 1's set and
    Figure 3's, seed 42 both): the two runs' squared difference at an epoch over the sum of their
    squared noises averages about 1 (1.13 for top-1, 0.94 for the loss over epochs 1-60)."""
    ratios: dict[str, list[float]] = {"test_acc1": [], "test_loss": []}
    for data in ("CIFAR10", "CIFAR100"):
        for br in ("0000", "0500", "1000"):
            a = f"Final_Output/BR_test_cos---/VGG11-{data}/BranchingConvNN_All_K9_Col_Col_br{br}_s42"
            b = f"Final_Output/loss_test_cos_first---/VGG11-{data}/lr_1e-4/BranchingConvNN_K9_col_col_br{br}"
            b += "_s42"
            same = {k: v for k, v in read_runs()[a].items() if k not in ("run", "output_dir")}
            assert same == {k: v for k, v in read_runs()[b].items() if k not in ("run", "output_dir")}
            for metric, values in ratios.items():
                for e in range(1, 61):
                    gap = value_at(a, e, metric) - value_at(b, e, metric)
                    values.append(gap**2 / (noise(a, e, metric) ** 2 + noise(b, e, metric) ** 2))
    for values in ratios.values():
        assert 0.75 < statistics.fmean(values) < 1.5


def test_compare_at_one_epoch() -> None:
    run = "Final_Output/BR_test_cos---/VGG11-CIFAR10/BranchingConvNN_All_K9_Col_Col_br0500_s42"
    theirs, spread = (
        float(RAW[run][2]["test_acc1"]),
        local_noise([float(r["test_acc1"]) for r in RAW[run]], 3),
    )
    cell = compare_at(run, 3, "test_acc1", 60.0, 1.5)
    assert cell == pytest.approx(
        {"authors": theirs, "authors_noise": spread, "gap": 60.0 - theirs, "gap_u": math.hypot(1.5, spread)}
    )
    assert compare_at(run, 3, "test_acc1", 60.0, None)["gap_u"] == pytest.approx(math.sqrt(2) * spread)
    assert compare_at(run, 151, "test_acc1", 60.0, 1.5) == dict.fromkeys(cell)
    assert compare_at(None, 3, "test_acc1", 60.0, 1.5) == dict.fromkeys(cell)


T4 = {r["row"]: r for r in read_paper("table4")}


def _record(row_id: str, seed: int, accs: list[float], batchmean: bool = False) -> dict:
    """A finished record of Table 4 row ``row_id`` with top-1 ``accs`` per epoch (loss 2 - acc / 100)."""
    cfg = copy.deepcopy(compose_config((*shlex.split(T4[row_id]["overrides"]), "budget=smoke")))
    epochs = []
    for e, acc in enumerate(accs, 1):
        row = {"epoch": e, "train_loss": 2.5 - acc / 100, "test_loss": 2.0 - acc / 100, "test_acc1": acc}
        if batchmean:
            row |= {"test_acc1_batchmean": acc + 0.5, "test_loss_batchmean": 2.0 - acc / 100}
        epochs.append(row)
    return {
        "status": "finished",
        "config": {**cfg, "epochs": len(accs)},
        "seed": seed,
        "budget": "smoke",
        "epochs": epochs,
        "final": {k: v for k, v in epochs[-1].items() if k != "epoch"},
        "best": {"epoch": len(accs), "test_acc1": accs[-1]},
    }


def test_table_cells_at_the_matched_epoch() -> None:
    rows = [T4[r] for r in ("t4.c10.branching.p1", "t4.c10.conv2d.p1", "t4.c10.convnn.p2")]
    records = [_record("t4.c10.branching.p1", s, [40.0, 50.0 + s], batchmean=True) for s in range(3)]
    records.append(_record("t4.c10.conv2d.p1", 0, [45.0, 55.0, 60.0]))
    lines = {line["row"]: line for line in build_table(rows, match_records(rows, records)[0])}
    branching = lines["t4.c10.branching.p1"]
    run = T4["t4.c10.branching.p1"]["authors_run"]
    theirs = float(RAW[run][1]["test_acc1"])  # epoch 2
    assert branching["epoch"] == 2 and branching["authors_test_acc1"] == theirs
    assert branching["gap_test_acc1"] == pytest.approx(51.5 - theirs)  # ours: the per-batch mean
    assert branching["gap_u_test_acc1"] == pytest.approx(math.hypot(1.0, noise(run, 2, "test_acc1")))
    assert branching["authors_test_loss"] == float(RAW[run][1]["test_loss"])
    conv = lines["t4.c10.conv2d.p1"]  # one seed, three epochs, per-image top-1 (no batch mean recorded)
    conv_run = T4["t4.c10.conv2d.p1"]["authors_run"]
    assert conv["epoch"] == 3 and conv["gap_test_acc1"] == pytest.approx(
        60.0 - float(RAW[conv_run][2]["test_acc1"])
    )
    assert conv["gap_u_test_acc1"] == pytest.approx(math.sqrt(2) * noise(conv_run, 3, "test_acc1"))
    assert lines["t4.c10.convnn.p2"]["authors_test_acc1"] is None  # no runs of ours: no epoch E


def test_tables_at_an_earlier_epoch() -> None:
    three = _record("t4.c10.conv2d.p1", 0, [45.0, 55.0, 52.0], batchmean=True)
    two = at_epoch(three, 2)
    assert two["status"] == "finished" and [e["epoch"] for e in two["epochs"]] == [1, 2]
    assert two["final"]["test_acc1"] == 55.0 and two["final"]["test_acc1_batchmean"] == 55.5
    assert (two["best"]["epoch"], two["best"]["test_loss"], two["best"]["test_acc1"]) == (2, 2.0 - 0.55, 55.0)
    assert two["best"]["test_acc1_batchmean"] == 55.5  # as a record that ended at epoch 2 holds it
    assert at_epoch(three, 3)["best"]["epoch"] == 2  # 55 at epoch 2 beats 52 at epoch 3
    assert at_epoch(three, 4)["status"] == "running" and at_epoch(three, 4)["final"] is None
    nan = copy.deepcopy(three)
    nan["epochs"][1]["test_loss"] = math.nan
    assert at_epoch(nan, 2)["status"] == "running"
    rows = [T4["t4.c10.conv2d.p1"]]
    line = build_table(rows, match_records(rows, [at_epoch(three, 1)])[0])[0]
    run = T4["t4.c10.conv2d.p1"]["authors_run"]
    assert line["epoch"] == 1 and line["gap_test_acc1"] == pytest.approx(
        45.5 - float(RAW[run][0]["test_acc1"])
    )


def test_held_from_by_hand() -> None:
    t, f = True, False
    assert held_from([f, t, t, t, t, t, f, t, t]) == (2, 8)
    assert held_from([t] * 4) == (None, 1)  # never 5 in a row, but to the end from the first
    assert held_from([t, t, t, t, t, f]) == (1, None)
    assert held_from([]) == (None, None)


def test_matched_verdicts_on_hand_made_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    # 'a' trails 'b' by 5 for epochs 1-5, then leads by 3; both wiggle by ±0.5 (noise 0.62 each)
    wiggle = [0.5 * (-1.0) ** e for e in range(1, 21)]
    hand = {
        "a": [50.0 + (e - 5.0 if e <= 5 else 3.0) + w for e, w in zip(range(1, 21), wiggle, strict=True)],
        "b": [50.0 + (e - 0.0 if e <= 5 else 0.0) - w for e, w in zip(range(1, 21), wiggle, strict=True)],
    }
    monkeypatch.setattr(claims, "curve", lambda run, metric: hand[run])
    claim = Claim("a beats b", "a", "b")

    def at(epoch: int, diff: float | None, s: float | None) -> dict:
        return claims.judge_matched(
            claim, {"authors_run": "a", "epoch": epoch}, {"authors_run": "b", "epoch": epoch}, diff, s
        )

    early = at(3, -4.0, 1.0)  # their d(3) = -5 + 2 * (-0.5) = -6: the opposite; ours too
    assert (early["first_run"], early["to_end"]) == (6, 6)
    assert early["matched"] == NOT_TESTABLE and early["authors_diff"] == pytest.approx(-6.0)
    assert early["matched_why"] == "the authors' runs show the opposite at epoch 3; ours agree"
    assert at(3, 4.0, 1.0)["matched_why"].endswith("ours disagree")
    assert at(3, 0.5, 1.0)["matched_why"].endswith("ours inconclusive")
    assert at(12, 2.0, 1.0)["matched"] == CONSISTENT  # their d = +3 ± n
    assert at(12, -2.0, 1.0)["matched"] == INCONSISTENT
    assert at(12, -0.5, 1.0)["matched"] == INCONCLUSIVE
    assert at(12, 2.0, None)["matched"] == INCONCLUSIVE  # one seed: no spread
    assert at(30, 2.0, 1.0)["matched_why"] == "epoch 30 is past the authors' log"
    uneven = claims.judge_matched(
        claim, {"authors_run": "a", "epoch": 3}, {"authors_run": "b", "epoch": 2}, 1, 1
    )
    assert uneven["matched_why"] == "our rows end at different epochs (3, 2)"
    ties = Claim("a matches or beats b", "a", "b", ties=True)
    matched = claims.judge_matched(
        ties, {"authors_run": "a", "epoch": 12}, {"authors_run": "b", "epoch": 12}, -0.5, 1.0
    )
    assert matched["matched"] == CONSISTENT  # within our spread: matching is what it says


def test_every_figure_series_names_existing_authors_runs() -> None:
    count = 0
    for name, spec in FIGURES.items():
        for series in spec.series:
            assert series.authors, (name, series.label)
            for data in ("cifar10", "cifar100"):
                for lr in (1e-3, 1e-4, 1e-5) if name == "fig10" else (None,):
                    for _, template in series.authors:
                        assert authors_run(template, {"data.name": data, "optim.lr": lr}) is not None, (
                            template
                        )
                        count += 1
    # per dataset: fig3 3, fig4 39, fig5 63, fig6 2, fig7 44, fig8 26, fig10 3 x 3 learning rates
    assert count == 2 * (3 + 39 + 63 + 2 + 44 + 26 + 9)
    assert authors_run(FIGURES["fig3"].series[0].authors[0][1], {"data.name": "imagenet"}) is None


def test_loss_figures_overlay_the_authors_curve_to_our_last_epoch() -> None:
    records = [_record("t4.c10.branching.p1", s, [40.0, 50.0 + s]) for s in range(2)]
    for r in records:
        r["config"]["layer"] = {**r["config"]["layer"], "select_by": "features"}
    fig = draw_figure("fig3", records, "synthetic")
    run = {r["row"]: r for r in read_paper("table1")}["t1.c10.features.r0.500"]["authors_run"]  # the row's
    for ax, key in zip(fig.axes, ("train_loss", "test_loss", "test_acc1"), strict=True):
        ours, theirs = ax.get_lines()
        assert (ours.get_linestyle(), theirs.get_linestyle()) == ("-", "--")
        assert ours.get_color() == theirs.get_color()
        assert list(theirs.get_xdata()) == [1, 2]
        assert list(theirs.get_ydata()) == [float(RAW[run][e][key]) for e in (0, 1)]
    assert list(fig.axes[2].get_lines()[0].get_ydata()) == [40.0, 50.5]  # ours: mean over the seeds


def test_sweep_figures_put_the_authors_points_at_our_x(tmp_path: Path) -> None:
    def at(r: int, acc: float) -> dict:
        config = {
            "layer": {"ratio": 0.5, "sampling": "random", "num_candidates": r * r},
            "data": {"name": "cifar10"},
        }
        return {
            "status": "finished",
            "config": {**config, "epochs": 3},
            "seed": 0,
            "best": {"test_acc1": acc},
        }

    records = [at(4, 50.0), at(8, 52.0)]
    series = FIGURES["fig5"].series[0]
    points = authors_points(records, series, {"data.name": "cifar10"}, 3)
    expected = []
    for r in (4, 8):
        run = f"Final_Output/N_test_cos---/VGG11-CIFAR10/BranchingConvNN_random_NS{r}_col_col_br0500_s42"
        expected.append((float(r), max(float(row["test_acc1"]) for row in RAW[run][:3])))
    assert points == expected
    assert (
        authors_points(records, FIGURES["fig5"].series[1], {"data.name": "cifar10"}, 3) == []
    )  # no spatial runs
    ax = draw_figure("fig5", records, "synthetic").axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in dashed] == [[4.0, 8.0]]


def test_when_the_authors_runs_show_the_claims_issue_18_names() -> None:
    t1 = {r["row"]: {"authors_run": r["authors_run"], "epoch": 3} for r in read_paper("table1")}
    t2 = {r["row"]: {"authors_run": r["authors_run"], "epoch": 2} for r in read_paper("table2")}
    ahead = Claim("λ = 0.5 ahead of Conv2D", "t1.c10.features.r0.500", "t1.c10.features.conv2d")
    matched = claims.judge_matched(ahead, t1[ahead.better], t1[ahead.worse], None, None)
    assert (matched["first_run"], matched["to_end"]) == (29, 82)  # "after epoch 29", "from epoch 82"
    assert matched["authors_diff"] == pytest.approx(61.6992 - 70.8203)  # epoch 3: λ = 0.5 61.7, Conv2D 70.8
    random = Claim("random ahead of attention", "t2.c10.convnn_random", "t2.c10.attention")
    matched = claims.judge_matched(random, t2[random.better], t2[random.worse], None, None)
    assert matched["to_end"] == 81 and matched["authors_diff"] < -8  # "trails by 8 points at epoch 2"

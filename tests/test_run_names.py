"""The same run always lands in the same directory: the run directory's name is a function of the run
identity and seed only (``convnn.runs.rundir.run_name``), for single runs and sweeps; a run an older
version put in an override-named directory is found and moved; tables refuse a run recorded twice."""

import shutil
import sys
from pathlib import Path

import pytest

from convnn.report import cli as tables_cli
from convnn.runs import rundir
from convnn.runs.identity import identity_key
from convnn.runs.records import read_record, write_record
from convnn.train import app as train
from tests.test_identity import BASE, _with
from tests.test_tables import record as table4_record
from tests.test_train import QUIET, TINY_DATA, TINY_VGG, convnn_train

TINY = [*TINY_DATA, *TINY_VGG, "layer=conv2d", *QUIET, "epochs=1"]


def test_the_name_shows_what_differs_from_the_option_files_then_id_and_seed():
    # BASE: vgg11 (its defaults), branching at its default ratio 0.5, CIFAR-10 with 512/256 subsets
    assert rundir.run_name(BASE) == (
        "vgg11-branching-cifar10,optim.lr=0.0001,epochs=2,data.subset.train=512,data.subset.test=256,"
        f"id={identity_key(BASE)[:10]},seed=0"
    )
    named = rundir.run_name(_with("layer.ratio", 0.25))
    assert named.startswith("vgg11-branching-cifar10,layer.ratio=0.25,optim.lr=0.0001,")


def test_bookkeeping_does_not_change_the_name_and_the_seed_is_its_last_part():
    for path, value in [
        ("trainer.deterministic", True),
        ("data.format", "imagefolder"),
        ("data.root", "/b"),
        ("budget", "other-label"),
        ("resume", False),
        ("logger.name", "wandb"),
        ("trainer.devices", 4),
    ]:
        assert rundir.run_name(_with(path, value)) == rundir.run_name(BASE), path
    assert rundir.run_name(_with("seed", 3)) == rundir.run_name(BASE).removesuffix("seed=0") + "seed=3"


def test_equal_values_written_differently_name_one_directory():
    as_int, as_float = _with("layer.ratio", 1), _with("layer.ratio", 1.0)
    assert as_int == as_float and rundir.run_name(as_int) == rundir.run_name(as_float)
    assert ",layer.ratio=1," in rundir.run_name(as_int)


def test_long_or_odd_values_stay_a_safe_unique_name():
    long_a = _with("layer.note", "x" * 300)
    long_b = _with("layer.note", "x" * 299 + "y")
    a, b = rundir.run_name(long_a), rundir.run_name(long_b)
    assert a != b and len(a) < 200 and a.split(",id=")[0].endswith(",...")
    odd = rundir.run_name(_with("layer.note", "a/b c,d"))
    assert ",layer.note=a-b-c-d," in odd and "/" not in odd


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_equal_runs_written_differently_land_in_one_directory(tmp_path, monkeypatch, capsys):
    """The issue's cases: an explicit default seed, ``trainer.deterministic=true``, ``data.format=``
    and a key given twice each find the finished run (and retrain nothing), alone or in a sweep."""
    run_dir = convnn_train(tmp_path, *TINY, monkeypatch=monkeypatch)
    assert run_dir == tmp_path / "default" / rundir.run_name(read_record(run_dir)["config"])
    before = _files(tmp_path)
    for same in (
        ["seed=0"],
        ["trainer.deterministic=true"],
        ["data.format=imagefolder"],
        ["epochs=2", "epochs=1"],
    ):
        capsys.readouterr()
        convnn_train(tmp_path, *TINY, *same, monkeypatch=monkeypatch)
        assert f"{run_dir} already finished; nothing to do" in capsys.readouterr().out, same
        assert _files(tmp_path) == before, same
    argv = ["convnn-train", "-m", f"out_dir={tmp_path}", *TINY, "trainer.deterministic=true", "seed=0"]
    monkeypatch.setattr(sys, "argv", argv)
    train.main()
    assert "sweep summary: 0 finished, 1 skipped, 0 failed" in capsys.readouterr().out
    assert _files(tmp_path).keys() - before.keys() == {"default/multirun.yaml"}  # the sweep's own file


def test_a_run_in_its_older_override_named_directory_is_moved_not_retrained(tmp_path, monkeypatch, capsys):
    """A run an older version named by its overrides is moved to its name now; a moved run prints
    where it is now, not the path its record was written at."""
    old = convnn_train(tmp_path / "a", *TINY, monkeypatch=monkeypatch)
    (tmp_path / "a").rename(tmp_path / "b")
    run_dir = tmp_path / "b" / old.relative_to(tmp_path / "a")
    legacy = run_dir.parent / rundir.legacy_run_name([f"out_dir={tmp_path / 'b'}", *TINY])
    assert legacy.name.startswith("batch_size=32,data.test_size=32,")  # what older versions named it
    run_dir.rename(legacy)
    record = (legacy / "results.json").read_text()
    capsys.readouterr()
    convnn_train(tmp_path / "b", *TINY, monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert f"moved {legacy} to {run_dir}" in out and f"{run_dir} already finished" in out
    assert not legacy.exists() and (run_dir / "results.json").read_text() == record
    assert not (run_dir / "run.lock").exists()
    summary = "".join(out.replace("│", "").split())  # the summary table folds long paths
    assert "".join(str(run_dir).split()) in summary and str(old) not in out
    assert read_record(run_dir)["run_dir"] == str(old)  # the finished record itself is left as it was

    # an older readable part (an option file's default changed since), the same id and seed
    relabelled = run_dir.parent / f"vgg11-conv2d-synthetic,layer.bias=true,id={run_dir.name.split(',id=')[1]}"
    run_dir.rename(relabelled)
    convnn_train(tmp_path / "b", *TINY, monkeypatch=monkeypatch)
    assert f"moved {relabelled} to {run_dir}" in capsys.readouterr().out and not relabelled.exists()
    assert (run_dir / "results.json").read_text() == record


def test_tables_and_figures_refuse_one_run_recorded_twice(tmp_path, capsys):
    source = tmp_path / "runs"
    seeds = [table4_record("t4.c10.branching.p1", seed, 80.0 + seed, 1.0, 81.0) for seed in (0, 1)]
    for i, r in enumerate(seeds):
        write_record(source / f"run{i}" / "results.json", r)
    shutil.copytree(source / "run0", source / "run0-again")  # seed 0 trained a second time
    for command in (["table=table4"], ["figure=fig3"]):
        with pytest.raises(SystemExit) as e:
            tables_cli.main([*command, f"source={source}", f"out={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert f"seed 0 in {source / 'run0'}, {source / 'run0-again'};" in err
        assert "1 run(s) recorded more than once (same identity and seed)" in err
    shutil.rmtree(source / "run0-again")
    assert tables_cli.run(["table=table4", f"source={source}", f"out={tmp_path / 'out'}"])

"""A record that breaks the schema is unreadable: named in one line, never trusted, never overwritten
without ``overwrite=true`` (``convnn-train`` and sweeps), skipped with a one-line warning by
``convnn-tables`` (tables, figures, claims). Each with a record corrupted on disk for real."""

import json
import sys
from pathlib import Path

import pytest

from convnn.report import cli as tables_cli
from convnn.report.tables import setup_key
from convnn.runs.records import read_record
from convnn.train import app as train
from tests.test_claims import source  # noqa: F401 - the fixture: records of the mini reproduction
from tests.test_train import QUIET, TINY_DATA, TINY_VGG, convnn_train

TINY = [*TINY_DATA, *TINY_VGG, "layer=conv2d", *QUIET, "epochs=1"]


def _corrupt(path: Path, original: str, **fields) -> bytes:
    """Write ``original`` (a record's text) with ``fields`` changed to ``path``; the bytes written."""
    path.write_text(json.dumps({**json.loads(original), **fields}))
    return path.read_bytes()


def _refused(out: Path, *overrides: str, monkeypatch, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convnn_train(out, *overrides, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_wrong_typed_record_is_refused_with_or_without_a_checkpoint_and_in_a_sweep(
    tmp_path, monkeypatch, capsys
):
    run_dir = convnn_train(tmp_path, *TINY, monkeypatch=monkeypatch)
    path, ckpt = run_dir / "results.json", run_dir / "checkpoints" / "last.ckpt"
    original = path.read_text()
    assert ckpt.is_file()
    corrupt = _corrupt(path, original, epochs="x")  # with a checkpoint (was: an AttributeError traceback)
    err = _refused(tmp_path, *TINY, monkeypatch=monkeypatch, capsys=capsys)
    assert f"{path} is not a valid run record (field 'epochs' is \"x\"; expected a list of epoch" in err
    assert path.read_bytes() == corrupt and ckpt.is_file()

    ckpt.unlink()  # as mini and smoke budgets leave it (was: retrained, the result overwritten)
    corrupt = _corrupt(path, original, params="x")
    err = _refused(tmp_path, *TINY, monkeypatch=monkeypatch, capsys=capsys)
    assert "(field 'params' is \"x\"; expected an integer); delete it or rerun with overwrite=true" in err
    monkeypatch.setattr(sys, "argv", ["convnn-train", "-m", f"out_dir={tmp_path}", *TINY, "seed=0"])
    with pytest.raises(SystemExit) as e:
        train.main()
    out = capsys.readouterr().out
    assert e.value.code == 1 and "sweep summary: 0 finished, 0 skipped, 1 failed" in out
    assert f"corrupt: {path} is not a valid run record (field 'params'" in out
    assert path.read_bytes() == corrupt

    convnn_train(tmp_path, *TINY, "overwrite=true", monkeypatch=monkeypatch)
    assert read_record(path)["status"] == "finished" and isinstance(read_record(path)["params"], int)


@pytest.mark.parametrize("command", ["table=table2 dataset=cifar10", "figure=fig3", "claims=mini"])
def test_reports_skip_an_unreadable_record_with_one_line_naming_it(
    command,
    source,  # noqa: F811 - the imported fixture
    tmp_path,
    capsys,
):
    good = source / "t1.c10.features.conv2d" / "0" / "results.json"
    bad = source / "hand-edited" / "results.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({**json.loads(good.read_text()), "params": "x"}))
    args = [*command.split(), f"source={source}", f"out={tmp_path / 'out'}"]
    if command != "claims=mini":  # the source also holds a smoke run
        args.append("budget=mini")
    if command == "figure=fig3":  # Table 1's VGG runs (the source also holds Table 2's ViT runs)
        args.append(f"setup={setup_key(read_record(good))}")
    tables_cli.main(args)  # returns: no error
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"convnn-tables: warning: skipped {bad} is not a valid run record (field 'params' is \"x\"; "
        "expected an integer); delete it or rerun with overwrite=true"
    ]

import json
import os

import pytest

from convnn import records
from convnn.records import collect_records, read_record, summarize_epochs, write_record


def _row(epoch, acc1, loss=1.0):
    return {"epoch": epoch, "test_loss": loss, "test_acc1": acc1, "test_acc5": 90.0}


def test_write_then_read_round_trips(tmp_path):
    record = {"schema": records.SCHEMA_VERSION, "status": "running", "epochs": [_row(1, 50.0)]}
    write_record(tmp_path / "run" / "results.json", record)
    assert read_record(tmp_path / "run") == record
    assert read_record(tmp_path / "run" / "results.json") == record


def test_a_failed_write_leaves_the_old_record_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_record(path, {"status": "running"})

    def broken_dump(obj, f, **kwargs):
        f.write('{"status": "fin')  # half a record, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_record(path, {"status": "finished"})
    assert read_record(path) == {"status": "running"}
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_replaces_atomically_via_os_replace(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((os.path.dirname(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_record(tmp_path / "results.json", {"a": 1})
    assert calls == [(str(tmp_path), str(tmp_path / "results.json"))]


def test_collect_walks_the_tree_in_run_dir_order(tmp_path):
    for name in ("b/x", "a", "b/y/z"):
        write_record(tmp_path / name / "results.json", {"run_dir": name})
    (tmp_path / "a" / "other.json").write_text("{}")
    assert [r["run_dir"] for r in collect_records(tmp_path)] == ["a", "b/x", "b/y/z"]


def test_final_is_the_last_epoch_and_best_the_top1_epoch():
    rows = [_row(1, 40.0, 2.0), _row(2, 61.0, 1.5), _row(3, 61.0, 1.4), _row(4, 55.0, 1.9)]
    final, best = summarize_epochs(rows)
    assert final == {"test_loss": 1.9, "test_acc1": 55.0, "test_acc5": 90.0}
    assert best == {"epoch": 2, "test_loss": 1.5, "test_acc1": 61.0, "test_acc5": 90.0}
    assert summarize_epochs([]) == (None, None)

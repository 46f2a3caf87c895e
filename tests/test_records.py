import json
import math
import os
import stat
import warnings

import pytest

from convnn.runs import records
from convnn.runs.records import (
    RecordError,
    RunRecord,
    collect_records,
    read_record,
    summarize_epochs,
    write_record,
)
from convnn.train.callbacks import RecordCallback
from tests.faults import fill, small_fs


def _row(epoch, acc1, loss=1.0):
    return {"epoch": epoch, "test_loss": loss, "test_acc1": acc1, "test_acc5": 90.0}


CONFIG = {
    "seed": 0,
    "epochs": 3,
    "model": {"name": "vgg11"},
    "layer": {"name": "conv2d"},
    "data": {"name": "c"},
}


def valid(**fields) -> dict:
    """The smallest record the schema accepts (its required fields), plus ``fields``."""
    return {"status": "running", "config": CONFIG, "epochs": [], **fields}


def test_write_then_read_round_trips(tmp_path):
    record = valid(schema=records.SCHEMA_VERSION, epochs=[_row(1, 50.0)])
    write_record(tmp_path / "run" / "results.json", record)
    assert read_record(tmp_path / "run") == record
    assert read_record(tmp_path / "run" / "results.json") == record


def test_a_write_onto_a_full_disk_leaves_the_old_record_and_no_temp_file(tmp_path):
    with small_fs(tmp_path / "fs", 64) as fs:
        write_record(fs / "results.json", valid())
        fill(fs, 2048)
        with pytest.raises(OSError) as e:
            write_record(fs / "results.json", valid(status="finished", blob="x" * 20_000))
        assert e.value.errno == 28  # ENOSPC, for real
        assert read_record(fs) == valid()
        assert sorted(os.listdir(fs)) == [".filler", "results.json"]


def test_records_are_strict_json_with_non_finite_values_as_null(tmp_path):
    write_record(tmp_path / "results.json", {"loss": math.nan, "rows": [{"a": math.inf, "b": 1.5}]})
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "rows": [{"a": None, "b": 1.5}]}


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_records_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_record(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode


@pytest.mark.parametrize("text", ['{"status": "fin', "", '{"loss": NaN}', "[1, 2]", "\xff\xfe"])
def test_an_unreadable_record_is_named_in_one_line(tmp_path, text):
    (tmp_path / "results.json").write_text(text, encoding="latin-1")
    with pytest.raises(RecordError) as e:
        read_record(tmp_path)
    assert str(tmp_path / "results.json") in str(e.value) and "\n" not in str(e.value)


def test_collect_walks_the_tree_in_run_dir_order_and_skips_corrupt_records(tmp_path):
    for name in ("b/x", "a", "b/y/z"):
        write_record(tmp_path / name / "results.json", valid(run_dir=f"/moved/from/{name}"))
    (tmp_path / "a" / "other.json").write_text("{}")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text('{"status": "runn')  # truncated
    write_record(tmp_path / "d" / "results.json", valid(params="x"))  # wrong-typed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = collect_records(tmp_path)
    assert [r["run_dir"] for r in found] == [str(tmp_path / n) for n in ("a", "b/x", "b/y/z")]  # where now
    assert [str(w.message).split(" is not a valid run record")[0] for w in caught] == [
        f"skipped: {tmp_path / d / 'results.json'}" for d in ("c", "d")
    ]


def test_final_is_the_last_epoch_and_best_the_top1_epoch():
    rows = [_row(1, 40.0, 2.0), _row(2, 61.0, 1.5), _row(3, 61.0, 1.4), _row(4, 55.0, 1.9)]
    final, best = summarize_epochs(rows)
    assert final == {"test_loss": 1.9, "test_acc1": 55.0, "test_acc5": 90.0}
    assert best == {"epoch": 2, "test_loss": 1.5, "test_acc1": 61.0, "test_acc5": 90.0}
    assert summarize_epochs([]) == (None, None)
    assert summarize_epochs([_row(1, 40.0), _row(2, math.nan, math.nan)])[1]["epoch"] == 1


def test_run_record_lifecycle(tmp_path):
    path = tmp_path / "results.json"
    rec = RunRecord.create(path, {"config": CONFIG, "seed": 0})
    on_disk = read_record(path)
    assert (on_disk["status"], on_disk["epochs"], on_disk["launcher"], on_disk["resumable"]) == (
        "running", [], {}, True,
    )  # fmt: skip
    rec.data["launcher"]["slurm_job_id"] = "123_4"  # other code extends the record
    rec.update([_row(1, 30.0), _row(2, 45.0)])
    assert read_record(path)["best"]["epoch"] == 2 and read_record(path)["launcher"] == {
        "slurm_job_id": "123_4"
    }
    rec.interrupt("SIGTERM")
    assert (read_record(path)["status"], read_record(path)["error"]) == (
        "interrupted",
        "interrupted by SIGTERM",
    )

    again = RunRecord.create(path, {"config": CONFIG, "seed": 0}, previous=RunRecord.load(tmp_path).data)
    assert again.epochs == rec.epochs and again.data["started_at"] == rec.data["started_at"]
    assert again.data["wall_time_s"] >= rec.data["wall_time_s"]
    again.update([*rec.epochs, _row(3, math.nan, math.nan)])
    again.diverge(3, "non-finite loss in epoch 3")
    loaded = RunRecord.load(path)
    assert (loaded.status, loaded.data["diverged_at_epoch"], loaded.data["resumable"]) == (
        "diverged",
        3,
        False,
    )
    assert loaded.epochs[-1]["test_loss"] is None and loaded.data["final"]["test_loss"] is None
    loaded.fail("RuntimeError: x")
    assert RunRecord.load(path).status == "failed"
    RunRecord.create(path, {"config": CONFIG}).finish()
    assert read_record(path)["status"] == "finished" and read_record(path)["finished_at"]


def test_a_disabled_record_never_writes(tmp_path):
    RunRecord.create(tmp_path / "results.json", {}, enabled=False).finish()
    assert not (tmp_path / "results.json").exists()


def test_an_interrupted_record_keeps_only_the_checkpointed_epochs(tmp_path):
    """A signal after an epoch's record row but before its checkpoint is on disk (built and not yet
    written, or not built): the interrupted record lists the epochs of the checkpoint on disk (the
    resume trains the rest again); with no checkpoint on disk, all of them."""
    rows = [
        {"epoch": i, "train_loss": 1.0 / i, "test_loss": 1.0 / i, "test_acc1": 10.0 * i} for i in (1, 2, 3)
    ]
    for written, building, kept in ((2, None, [1, 2]), (2, 3, [1, 2]), (None, 1, [1, 2, 3])):
        path = tmp_path / f"{written}-{building}" / "results.json"
        path.parent.mkdir()
        record = RunRecord(path, valid())
        recorder = RecordCallback(record, verbose=False)
        for epochs, on_disk in ((written, True), (building, False)):
            if epochs:
                recorder.history = rows[:epochs]
                recorder.on_save_checkpoint(None, None, {})
                if on_disk:
                    recorder.checkpoint_written()
        recorder.history = rows
        record.update(rows)
        recorder.interrupt("SIGINT")
        saved = read_record(path)
        assert saved["status"] == "interrupted" and [r["epoch"] for r in saved["epochs"]] == kept


@pytest.mark.parametrize(
    "change,field,expected",
    [
        ({"epochs": "x"}, "'epochs' is \"x\"", "expected a list of epoch objects"),
        ({"params": "x"}, "'params' is \"x\"", "expected an integer"),
        ({"gflops": None}, "'gflops' is null", "expected a number"),
        ({"status": "done"}, "'status' is \"done\"", "expected one of ['running', 'finished'"),
        ({"config": {**CONFIG, "epochs": "x"}}, "'config.epochs' is \"x\"", "expected an integer >= 1"),
        ({"config": {**CONFIG, "seed": 1.5}}, "'config.seed' is 1.5", "expected an integer"),
        ({"epochs": [{"epoch": 0}]}, "'epochs[0].epoch' is 0", "expected an integer >= 1"),
        ({"epochs": [_row(1, "50")]}, "'epochs[0].test_acc1' is \"50\"", "expected a number or null"),
        ({"final": {"test_acc1": [1]}}, "'final.test_acc1' is [1]", "expected a number or null"),
        ({"resumable": "yes"}, "'resumable' is \"yes\"", "expected true or false"),
        ({"diverged_at_epoch": "1"}, "'diverged_at_epoch' is \"1\"", "expected an integer >= 1"),
    ],
)
def test_a_record_breaking_the_schema_is_unreadable_naming_the_field(tmp_path, change, field, expected):
    write_record(tmp_path / "results.json", {**valid(), **change})
    with pytest.raises(RecordError) as e:
        read_record(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'results.json'} is not a valid run record (field {field}; ")
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("missing", ["status", "config", "epochs"])
def test_a_record_missing_a_required_field_is_unreadable(tmp_path, missing):
    record = valid()
    del record[missing]
    write_record(tmp_path / "results.json", record)
    with pytest.raises(RecordError, match=f"field '{missing}' is missing"):
        read_record(tmp_path)


def test_every_record_convnn_train_writes_passes_the_schema(tmp_path):
    """The full field set (as ``RunRecord.create`` and ``convnn-train`` write it) is valid, and the
    schema lists exactly those fields."""
    fields = {
        "config": CONFIG, "identity": {}, "experiment": "default", "overrides": ["seed=0"], "run_dir": "r",
        "git_commit": None, "versions": {"torch": "2"}, "device": "cpu", "launcher": {}, "seed": 0,
        "numerics": {"deterministic": False, "precision": "32-true", "float32": {}},
        "data_feed": {"num_workers": 0, "pin_memory": False, "persistent_workers": False, "transforms": "c"},
        "threads": {"cores": 2, "threads": 2, "workers": 2, "threads_from": "auto", "workers_from": "auto",
                    "affinity": [0, 1], "slurm_cpus_per_task": None, "wait_policy": None},
        "distributed": {"world_size": 1, "batch_size_per_rank": 8, "eval_batch_size_per_rank": 8,
                        "train_images_per_epoch": 64, "batchnorm_layers": 0, "sync_batchnorm": False,
                        "ranks": []},
        "budget": "full", "effective_budget": {}, "params": 10, "trainable_params": 10, "gflops": 0.5,
        "gflops_profiler": 0.6, "unsupported_ops": {},
    }  # fmt: skip
    record = RunRecord.create(tmp_path / "results.json", fields)
    record.update([_row(1, 50.0), {**_row(2, math.nan, math.nan)}])
    record.diverge(2, "non-finite loss")
    on_disk = read_record(tmp_path)
    assert set(on_disk) == {*records.RECORD_FIELDS, "diverged_at_epoch"}

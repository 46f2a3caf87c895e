"""The wandb path end to end: a real training run logged offline by our Lightning logger (no key, no
network) is read back from its ``.wandb`` file and rebuilt into records by the code behind
``convnn-tables source=wandb:``; the records and the table equal those made from the run's
``results.json``. This is the proof that what training logs is what the table reader needs."""

from __future__ import annotations

import json
import shlex
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from wandb.proto import wandb_internal_pb2 as pb

from convnn.report.tables import make_table, read_paper, records_from_runs
from convnn.runs.records import LOGGED_ONCE, read_record
from convnn.train.loggers import wandb_mode
from tests.test_train import convnn_train

BLOCK, HEADER = 32768, 7  # LevelDB log format: 32 KiB blocks, 7-byte headers (crc32, length, type)
FULL, FIRST, LAST = 1, 2, 4  # MIDDLE (3) only extends the pending record


def read_wandb_log(path: Path) -> list[pb.Record]:
    """The records of a ``.wandb`` file (its first 7 bytes: ``:W&B``, magic, version); a record still
    being written at the end is left out."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            records.append(pb.Record.FromString(pending))
    return records


def _values(items: Any) -> dict[str, Any]:
    """``{key: value}`` of config / summary / history items (``key`` or ``nested_key``, JSON values)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


class OfflineRun:
    """A run read from its offline ``.wandb`` records, shaped like a ``wandb.Api`` run: ``id``,
    ``state`` (from the exit record), ``config`` (the run record's, then config updates), ``summary``
    (its updates in order) and ``history(pandas=False)`` (one dict per history record)."""

    def __init__(self, records: list[pb.Record]) -> None:
        by_type: dict[str, list[Any]] = {}
        for r in records:
            kind = r.WhichOneof("record_type")
            by_type.setdefault(kind, []).append(getattr(r, kind))
        (run,) = by_type["run"]
        self.id = run.run_id
        self.config = _values(run.config.update)
        for update in by_type.get("config", []):
            self.config |= _values(update.update)
        self.summary: dict[str, Any] = {}
        for update in by_type.get("summary", []):
            self.summary |= _values(update.update)
        self._history = [_values(h.item) for h in by_type.get("history", [])]
        exits = by_type.get("exit", [])
        self.state = ("finished" if exits[-1].exit_code == 0 else "failed") if exits else "running"

    def history(self, pandas: bool = True) -> list[dict[str, Any]]:
        assert not pandas
        return self._history


def cifar_like(root: Path, per_class: tuple[int, int] = (2, 1)) -> Path:
    """A 10-class 32x32 ImageFolder (``train/``, ``test/``) of random images, read as ``data=cifar10``."""
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / f"class{c}" / f"{i}.png")
    return root


def finished_log(run_dir: Path, timeout: float = 60.0) -> list[pb.Record]:
    """The offline run's records once its exit record is on disk (wandb-core may still be writing
    the file when ``finish()`` returns)."""
    [log] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_log(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_an_offline_wandb_run_makes_the_table_its_results_json_makes(tmp_path, monkeypatch):
    import wandb

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert wandb_mode("auto") == "offline"
    # Table 1's Conv2D row at budget=mini (VGG-11 x0.25), on a tiny CIFAR-10-shaped folder
    row = next(r for r in read_paper("table1") if r["row"] == "t1.c10.features.conv2d")
    data = cifar_like(tmp_path / "cifar10")
    run_dir = convnn_train(
        tmp_path / "runs",
        *shlex.split(row["overrides"]),
        "budget=mini",
        f"data.root={data}",
        "data.subset.train=null",
        "data.subset.test=null",
        "data.num_workers=0",
        "epochs=2",
        "batch_size=10",
        "logger=wandb",
        "trainer.progress_bar=none",
        monkeypatch=monkeypatch,
    )
    record = read_record(run_dir)
    assert record["status"] == "finished" and len(record["epochs"]) == 2
    run = OfflineRun(finished_log(run_dir))
    assert run.state == "finished"

    (rebuilt,) = records_from_runs([run], "wandb:offline")
    assert rebuilt["config"] == record["config"]
    assert rebuilt["epochs"] == record["epochs"]
    for key in ("status", "seed", "budget", "final", "best", "wall_time_s", *LOGGED_ONCE):
        assert rebuilt[key] == record[key], key

    # the same through `convnn-tables source=wandb:me/convnn`, wandb.Api answered by the offline run
    monkeypatch.setattr(
        wandb, "Api", lambda: SimpleNamespace(runs=lambda path: [run] * (path == "me/convnn"))
    )
    from_json = make_table("table1", str(tmp_path / "runs"), tmp_path / "json", dataset="cifar10")
    from_wandb = make_table("table1", "wandb:me/convnn", tmp_path / "wandb", dataset="cifar10")
    json_md, wandb_md = (paths[0].read_text().splitlines() for paths in (from_json, from_wandb))
    assert "1 records read, 1 matched to paper rows" in json_md[4]
    assert json_md[:2] + json_md[3:] == wandb_md[:2] + wandb_md[3:]  # all but the Made-by line (source)
    assert [x for x in from_json[1].read_text().splitlines() if not x.startswith("#")] == [
        x for x in from_wandb[1].read_text().splitlines() if not x.startswith("#")
    ]
    conv2d = next(x for x in wandb_md if x.startswith("| t1.c10.features.conv2d "))
    assert f"| 1 of 1 | {record['final']['test_loss']:.3f} | {record['final']['test_acc1']:.2f} |" in conv2d


def test_a_resumed_runs_repeated_epoch_keeps_its_last_history_row():
    """wandb keeps the rows a resumed run logs again for the epochs after its checkpoint."""
    rows = [
        {"epoch": 1.0, "train/loss": 2.0, "test/loss": 1.5, "test/acc1": 50.0},
        {"epoch": 2.0, "train/loss": 1.9, "test/loss": 1.4, "test/acc1": 55.0},  # lost with the process
        {"epoch": 2.0, "train/loss": 1.0, "test/loss": 1.2, "test/acc1": 60.0},  # after the resume
        {"trainer/global_step": 9},  # a row without test metrics
    ]
    run = SimpleNamespace(
        id="r", state="crashed", config={"seed": 3}, summary={}, history=lambda pandas: rows
    )
    (rec,) = records_from_runs([run], "wandb:me/convnn")
    assert [(e["epoch"], e["test_acc1"]) for e in rec["epochs"]] == [(1, 50.0), (2, 60.0)]
    assert rec["final"] == {"test_loss": 1.2, "test_acc1": 60.0} and rec["best"]["epoch"] == 2
    assert (rec["status"], rec["seed"], rec["run_dir"]) == ("crashed", 3, "wandb:me/convnn/r")

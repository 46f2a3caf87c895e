"""The run record: one ``results.json`` per run, the source of truth for tables.

A record is a JSON object with the fields of ``RECORD_SCHEMA`` (accuracies in percent, 0-100, like
the paper); :func:`read_record` checks every record it loads against that one schema and raises
``RecordError`` (one line: the file, the field, what was expected) for any that fails, so an
unreadable record is never trusted. :class:`RunRecord` is its only writer: it creates the record,
updates it after every epoch and closes it as ``finished``, ``failed``, ``diverged`` or
``interrupted``. Writes are atomic (temp file + ``os.replace``), strict JSON (a NaN or infinity is
written as ``null``) and readable like any file the user writes (the umask applies).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convnn.runs.identity import identity_key

SCHEMA_VERSION = 2
RECORD_NAME = "results.json"
STATUSES = ("running", "finished", "failed", "diverged", "interrupted")
EPOCH_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc1",
    "train_acc5",
    "test_loss",
    "test_acc1",
    "test_acc5",
    "test_loss_batchmean",
    "test_acc1_batchmean",
    "test_images",
    "epoch_time_s",
    "images_per_s",
)

LOGGED_ONCE = ("params", "trainable_params", "gflops", "gflops_profiler", "device")
"""Record fields a run logger keeps once (wandb: in the run's config, beside the resolved config);
the epoch fields go to its history, each under :func:`logged_name`."""


def logged_name(field: str) -> str:
    """The run loggers' name of an epoch field: ``train_acc1 -> train/acc1``, ``epoch_time_s`` as is."""
    split, _, metric = field.partition("_")
    return f"{split}/{metric}" if split in ("train", "test") else field


class RecordError(ValueError):
    """An unreadable ``results.json``; ``str(error)`` is one line naming the file and the problem."""


Check = Callable[[Any], bool]
Spec = tuple[str, Check]  # what a field must hold, in words, and the check
_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _or_null(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


STRING, STRING_OR_NULL, OBJECT = (
    ("a string", _is_str),
    ("a string or null", _or_null(_is_str)),
    ("an object", _is_object),
)
INTEGER, NUMBER = ("an integer", _is_int), ("a number", _is_number)
NUMBER_OR_NULL = ("a number or null", _or_null(_is_number))
METRICS_OR_NULL = ("an object of metrics or null", _or_null(_is_object))
RECORD_SCHEMA: dict[str, Spec] = {
    "schema": (f"the integer {SCHEMA_VERSION}", lambda v: _is_int(v) and v == SCHEMA_VERSION),
    "status": (f"one of {list(STATUSES)}", lambda v: v in STATUSES),
    "error": STRING_OR_NULL,
    "resumable": ("true or false", lambda v: isinstance(v, bool)),
    "config": ("an object (the resolved config)", _is_object),
    "identity": OBJECT,
    "experiment": STRING,
    "overrides": ("a list of strings", _str_list),
    "run_dir": STRING,
    "git_commit": STRING_OR_NULL,
    "versions": OBJECT,
    "device": STRING,
    "numerics": OBJECT,
    "data_feed": OBJECT,
    "threads": OBJECT,
    "launcher": OBJECT,
    "distributed": OBJECT,
    "seed": INTEGER,
    "budget": STRING,
    "effective_budget": OBJECT,
    "params": INTEGER,
    "trainable_params": INTEGER,
    "gflops": NUMBER,
    "gflops_profiler": NUMBER,
    "unsupported_ops": OBJECT,
    "epochs": ("a list of epoch objects", lambda v: isinstance(v, list)),
    "final": METRICS_OR_NULL,
    "best": METRICS_OR_NULL,
    "wall_time_s": NUMBER,
    "started_at": STRING,
    "finished_at": STRING_OR_NULL,
}
"""Every field ``convnn-train`` writes, with what it must hold. ``REQUIRED_FIELDS`` must be there; the
others, where present, must hold what is listed (a record may carry more: ``diverged_at_epoch``, an
integer >= 1, when it diverged; any extra JSON values other code adds)."""
RECORD_FIELDS = tuple(RECORD_SCHEMA)
REQUIRED_FIELDS = ("status", "config", "epochs")
NAMED = ("an object with a string name", lambda v: _is_object(v) and _is_str(v.get("name")))
POSITIVE_INT = ("an integer >= 1", lambda v: _is_int(v) and v >= 1)
CONFIG_SCHEMA: dict[str, Spec] = {
    "epochs": POSITIVE_INT,
    "model": NAMED,
    "layer": NAMED,
    "data": NAMED,
    "seed": INTEGER,
    "batch_size": POSITIVE_INT,
    "optim": OBJECT,
}
"""What the record's ``config`` holds (run states, tables and figures read these);
``REQUIRED_CONFIG`` must be there."""
REQUIRED_CONFIG = ("epochs", "model", "layer", "data")
OPTIONAL_SCHEMA: dict[str, Spec] = {"diverged_at_epoch": POSITIVE_INT}


def _field_checks(
    values: dict[str, Any], schema: dict[str, Spec], required: tuple[str, ...], prefix: str = ""
) -> list[tuple[str, Any, Spec]]:
    """``(dotted name, value or _MISSING, spec)`` for each field of ``schema`` that ``values`` holds
    or must hold."""
    return [
        (f"{prefix}{key}", values.get(key, _MISSING), spec)
        for key, spec in schema.items()
        if key in values or key in required
    ]


def schema_problem(record: dict[str, Any]) -> str | None:
    """The first way ``record`` breaks the schema (``field 'epochs' is "x"; expected ...``), or
    ``None`` for a valid record: ``RECORD_SCHEMA`` (``REQUIRED_FIELDS`` present), ``CONFIG_SCHEMA``
    under ``config`` (``REQUIRED_CONFIG`` present), and every epoch row, ``final`` and ``best``
    holding numbers or null (``epoch`` an integer >= 1)."""
    checks = _field_checks(record, {**RECORD_SCHEMA, **OPTIONAL_SCHEMA}, REQUIRED_FIELDS)
    if isinstance(record.get("config"), dict):
        checks += _field_checks(record["config"], CONFIG_SCHEMA, REQUIRED_CONFIG, "config.")
    rows = record["epochs"] if isinstance(record.get("epochs"), list) else []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            checks.append((f"epochs[{i}]", row, ("an object", _is_object)))
            continue
        checks.append((f"epochs[{i}].epoch", row.get("epoch", _MISSING), POSITIVE_INT))
        checks += [(f"epochs[{i}].{k}", v, NUMBER_OR_NULL) for k, v in row.items() if k != "epoch"]
    for part in ("final", "best"):
        if isinstance(record.get(part), dict):
            checks += [
                (f"{part}.{k}", v, POSITIVE_INT if k == "epoch" else NUMBER_OR_NULL)
                for k, v in record[part].items()
            ]
    for key, value, (expected, check) in checks:
        if value is _MISSING:
            return f"field {key!r} is missing; expected {expected}"
        if not check(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"field {key!r} is {shown}; expected {expected}"
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, so it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file beside it, which is fsynced, given
    the permissions a plain ``open`` would (``0o666`` minus the umask) and renamed over ``path``.
    On any error (a full disk, a signal) the old file stays as it was and no temp file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` as strict JSON to ``path`` atomically (see :func:`atomic_write`)."""
    text = json.dumps(strict_json(record), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text))


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def read_record(path: str | Path) -> dict[str, Any]:
    """Read one record; ``path`` is a ``results.json`` file or the run directory holding it.

    Raises ``RecordError`` naming the file when it is not a JSON object (truncated, corrupt, bare NaN)
    or breaks the record schema (:func:`schema_problem`: the field and what it must hold).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    try:
        record = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(
            f"{path} is not a valid run record ({e}); delete it or rerun with overwrite=true"
        ) from None
    if not isinstance(record, dict):
        raise RecordError(f"{path} is not a valid run record (a JSON {type(record).__name__}, not an object)")
    problem = schema_problem(record)
    if problem:
        raise RecordError(
            f"{path} is not a valid run record ({problem}); delete it or rerun with overwrite=true"
        )
    return record


def collect_records(root: str | Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every readable record under ``root`` (walked recursively), sorted by run directory, each with
    ``run_dir`` set to the directory it is in now (a moved run keeps the old path in its file). An
    unreadable one is skipped: its one-line reason is appended to ``skipped``, or warned about."""
    records = []
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            records.append({**read_record(path), "run_dir": str(path.parent)})
        except RecordError as e:
            if skipped is None:
                warnings.warn(f"skipped: {e}", stacklevel=2)
            else:
                skipped.append(str(e))
    return records


def check_unique(records: Iterable[dict[str, Any]]) -> None:
    """Refuse records that hold one run twice (equal identity and seed, e.g. the same run trained in
    two directories): a ``ValueError`` naming every such group's directories, so a table never counts
    a run twice."""
    groups: dict[tuple[str, Any], list[str]] = {}
    for record in records:
        config = record.get("config") or {}
        seed = record.get("seed", config.get("seed"))
        groups.setdefault((identity_key(config), seed), []).append(str(record.get("run_dir")))
    twice = [(key, dirs) for key, dirs in groups.items() if len(dirs) > 1]
    if twice:
        described = "; ".join(f"seed {seed} in {', '.join(sorted(dirs))}" for (_, seed), dirs in twice)
        raise ValueError(
            f"{len(twice)} run(s) recorded more than once (same identity and seed): {described}; "
            "keep one directory of each (or point source= at one copy)"
        )


def summarize_epochs(epochs: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(final, best)`` from per-epoch rows: the last epoch's test metrics and the best-top-1 epoch's.

    Ties in top-1 go to the earlier epoch; epochs without a finite top-1 never count as best. Both are
    ``None`` when no epoch has finished. The per-batch means (``test_loss_batchmean``,
    ``test_acc1_batchmean``) and the number of test images evaluated (``test_images``) are copied
    where the epochs have them.
    """
    if not epochs:
        return None, None
    keys = tuple(k for k in EPOCH_FIELDS if k.startswith("test_"))
    last = epochs[-1]
    final = {k: last[k] for k in keys if k in last}
    scored = [
        row
        for row in epochs
        if isinstance(row.get("test_acc1"), int | float) and math.isfinite(row["test_acc1"])
    ]
    if not scored:
        return final, None
    top = max(scored, key=lambda row: (row["test_acc1"], -row["epoch"]))
    return final, {"epoch": top["epoch"], **{k: top[k] for k in keys if k in top}}


class RunRecord:
    """The one owner of a run's ``results.json``.

    ``RunRecord.create(path, fields)`` starts a ``running`` record (or continues ``previous``, a
    killed or failed record of the same run, keeping its start time and wall time);
    :meth:`update` writes the epoch history after every epoch; :meth:`finish`, :meth:`fail`,
    :meth:`diverge` and :meth:`interrupt` close it. ``fields`` may hold any extra JSON values, e.g.
    the ``launcher`` dict (SLURM job id, array index, node) that other code fills in. Only an
    ``enabled`` record writes (rank 0 of a DDP run). ``wall_time_s`` counts every process that worked
    on the run.
    """

    def __init__(self, path: Path, data: dict[str, Any], enabled: bool = True) -> None:
        self.path, self.data, self.enabled = Path(path), data, enabled
        self._wall_before = float(data.get("wall_time_s") or 0.0)
        self._start = time.perf_counter()

    @classmethod
    def create(
        cls,
        path: str | Path,
        fields: dict[str, Any],
        previous: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> RunRecord:
        """A new ``running`` record at ``path`` made of ``fields``, written at once."""
        data = {
            "schema": SCHEMA_VERSION,
            "status": "running",
            "error": None,
            "resumable": True,
            "launcher": {},
            **fields,
            "epochs": list((previous or {}).get("epochs") or []),
            "final": None,
            "best": None,
            "wall_time_s": float((previous or {}).get("wall_time_s") or 0.0),
            "started_at": (previous or {}).get("started_at") or _now(),
            "finished_at": None,
        }
        record = cls(Path(path), data, enabled)
        record.update(data["epochs"])
        return record

    @classmethod
    def load(cls, path: str | Path, enabled: bool = True) -> RunRecord:
        """The record at ``path`` (a file or its run directory); ``RecordError`` if unreadable."""
        path = Path(path)
        if path.is_dir():
            path = path / RECORD_NAME
        return cls(path, read_record(path), enabled)

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self.data["epochs"]

    def _write(self) -> None:
        self.data["wall_time_s"] = self._wall_before + time.perf_counter() - self._start
        if self.enabled:
            write_record(self.path, self.data)

    def update(self, epochs: Iterable[dict[str, Any]]) -> None:
        """Record the epoch history so far (and the ``final`` / ``best`` derived from it)."""
        self.data["epochs"] = list(epochs)
        self.data["final"], self.data["best"] = summarize_epochs(self.data["epochs"])
        self._write()

    def _close(self, status: str, error: str | None, resumable: bool = True) -> None:
        self.data.update(status=status, error=error, resumable=resumable, finished_at=_now())
        self._write()

    def finish(self) -> None:
        """The run trained all its epochs."""
        self._close("finished", None)

    def fail(self, error: str, resumable: bool = True) -> None:
        """The run stopped on ``error``; ``resumable=False`` when re-launching cannot help (a corrupt
        checkpoint): the sweeper then reports it instead of relaunching it."""
        self._close("failed", error, resumable)

    def diverge(self, epoch: int, error: str) -> None:
        """A non-finite loss in ``epoch`` (1-based) stopped the run."""
        self.data["diverged_at_epoch"] = epoch
        self._close("diverged", error, resumable=False)

    def interrupt(self, signal_name: str) -> None:
        """A signal (``SIGINT``, ``SIGTERM``) stopped the run; it continues with ``resume=true``."""
        self._close("interrupted", f"interrupted by {signal_name}")

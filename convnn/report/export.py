"""Copy a runs folder's run records into a reproduction's folder, without machine paths
(``convnn-tables export=<runs dir> [out=<dir>]``), so that its tables, figures and claims regenerate
from the repository: ``convnn-tables ... source=<dir>``.

Only the records travel (``results.json``; no checkpoints, logs or Hydra files), each at the same
relative place under ``<dir>`` as under the runs folder. A record names absolute paths of the machine
that trained it; the copy names none: ``run_dir`` becomes the run's folder relative to ``<dir>``, a path
under the runs folder ``<runs>/...``, ``config.data.root`` (wherever it appears) ``<data root>``, and any
other absolute path ``<path>``. Tables, figures and claims never read those fields.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convnn.runs.identity import select
from convnn.runs.records import RECORD_NAME, RecordError, read_record, write_record

RUNS, DATA_ROOT, PATH = "<runs>", "<data root>", "<path>"
# an absolute POSIX path inside a string: a "/" that starts a word (not "a/b", not "wandb:me/p", not "://")
ABSOLUTE = re.compile(r"(?<![\w:/.~])/[^\s'\"/][^\s'\"]*")


def _prefixes(path: str | Path) -> list[str]:
    """The absolute spellings of ``path`` (as given and with links resolved), longest first."""
    spellings = {os.path.abspath(path), str(Path(path).resolve())}
    return sorted(spellings, key=len, reverse=True)


def path_scrubber(runs: Path, data_root: str | None) -> Callable[[str], str]:
    """A function replacing every absolute path in a string: under ``runs`` by ``<runs>/...``, under
    ``data_root`` (when absolute) by ``<data root>/...``, any other by ``<path>``."""
    known = [(p, RUNS) for p in _prefixes(runs)]
    if data_root and os.path.isabs(data_root):
        known += [(p, DATA_ROOT) for p in _prefixes(data_root)]

    def one(match: re.Match[str]) -> str:
        path = match.group(0)
        for prefix, name in known:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return name + path[len(prefix.rstrip("/")) :]
        return PATH

    return lambda text: ABSOLUTE.sub(one, text)


def portable(value: Any, scrub: Callable[[str], str]) -> Any:
    """``value`` (a record or part of one) with ``scrub`` applied to every string in it."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: portable(v, scrub) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, scrub) for v in value]
    return value


def export_records(source: str | Path, dest: str | Path) -> list[Path]:
    """Copy every readable record under ``source`` to the same relative place under ``dest``, without
    machine paths (see the module docstring); the written paths. A ``dest`` holding records of runs
    ``source`` lacks is refused before anything is written (a stale copy would join the tables)."""
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise ValueError(f"export={str(source)!r} is not a directory of runs")
    found = sorted(source.rglob(RECORD_NAME))
    if not found:
        raise ValueError(f"export={str(source)!r} holds no {RECORD_NAME}")
    wanted = {path.relative_to(source) for path in found}
    stale = sorted(
        str(p.relative_to(dest)) for p in dest.rglob(RECORD_NAME) if p.relative_to(dest) not in wanted
    )
    if stale:
        raise ValueError(
            f"out={str(dest)!r} holds {len(stale)} records of runs not in {str(source)!r} "
            f"(e.g. {stale[0]}); remove them or choose another out="
        )
    written = []
    for path in found:
        try:
            record = read_record(path)
        except RecordError as e:
            print(f"convnn-tables: warning: skipped {e}", file=sys.stderr)
            continue
        scrub = path_scrubber(source, select(record.get("config") or {}, "data.root"))
        copy = portable(record, scrub)
        copy["run_dir"] = path.parent.relative_to(source).as_posix()
        target = dest / path.relative_to(source)
        write_record(target, copy)
        written.append(target)
    return written

"""Regenerate a paper table from run records, side by side with the paper (``convnn-tables``, see
:mod:`convnn.report.cli`).

Records (``results.json``, see :mod:`convnn.runs.records`) come from a local directory or a wandb
project. Each paper row (``results/paper/<table>.csv``) is matched to the records whose resolved
``model``, ``layer``, ``data.name`` and ``optim.lr`` equal those Hydra composes from the row's
overrides; matched runs are averaged over seeds (one run recorded twice stops it, naming both
directories). Missing cells stay missing. Nothing here trains.

    convnn-tables table=table1 source=runs/paper/table1            # -> results/reproduced/table1.{md,csv,tex}
    convnn-tables table=table2 profile=true                        # params / GFLOPs columns, no training
    convnn-tables figure=fig4 source=runs/paper/fig4               # -> results/reproduced/fig4.png
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from convnn.paths import CONFIG_DIR, PAPER_DIR
from convnn.provenance import made_by
from convnn.report.authors import compare_at
from convnn.runs.identity import identity_diff, row_identity, select, setup_identity
from convnn.runs.records import (
    EPOCH_FIELDS,
    LOGGED_ONCE,
    check_unique,
    collect_records,
    logged_name,
    summarize_epochs,
)

OUT_DIR = Path("results") / "reproduced"  # relative: the working directory's, never the package's
TABLES = ("table1", "table2", "table3", "table4", "table5", "resnet50")
WANDB_PREFIX = "wandb:"
MISSING = "missing"
BATCHMEAN_METRICS = ("test_loss_batchmean", "test_acc1_batchmean")

Record = dict[str, Any]


def read_paper(table: str, paper_dir: Path = PAPER_DIR) -> list[dict[str, str]]:
    """The paper's rows of ``table`` as printed (strings), from ``results/paper/<table>.csv`` (its
    ``#`` lines say how it was made)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables: {list(TABLES)}")
    with open(paper_dir / f"{table}.csv", newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@cache
def compose_config(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The resolved ``model``, ``layer``, ``data`` and ``optim`` of the training config
    (``configs/train.yaml``) for ``overrides``, as plain containers (what :func:`match_key` reads)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "layer", "data", "optim")
    }


def match_key(config: Mapping[str, Any]) -> str:
    """What identifies a paper row in a resolved config (:func:`convnn.runs.identity.row_identity`)."""
    return json.dumps(row_identity(config), sort_keys=True, default=str)


def match_records(
    rows: Sequence[Mapping[str, str]],
    records: Sequence[Record],
    compose_fn: Callable[[tuple[str, ...]], Mapping[str, Any]] = compose_config,
) -> tuple[dict[str, list[Record]], list[Record]]:
    """``({row id: its records}, unmatched records)``; rows are composed once per budget in use."""
    budgets = sorted({r.get("budget") for r in records}, key=str)
    rows_of_key: dict[str, list[str]] = {}
    for row in rows:
        for budget in budgets:
            extra = () if budget is None else (f"budget={budget}",)
            key = match_key(compose_fn((*shlex.split(row["overrides"]), *extra)))
            rows_of_key.setdefault(key, []).append(row["row"])
    matched: dict[str, list[Record]] = {row["row"]: [] for row in rows}
    unmatched = []
    for record in records:
        ids = rows_of_key.get(match_key(record.get("config", {})), [])
        for row_id in ids:
            matched[row_id].append(record)
        if not ids:
            unmatched.append(record)
    return matched, unmatched


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite ``values`` (``None`` when too few)."""
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """Seed statistics of one row's finished runs: final-epoch and best-epoch metrics, accounting."""
    done = [r for r in records if r.get("status") == "finished" and r.get("final")]
    diverged = sum(r.get("status") == "diverged" for r in records)
    out: dict[str, Any] = {
        "n": len(done),
        "runs": len(records),
        "diverged": diverged,
        "incomplete": len(records) - len(done) - diverged,
    }
    for name, part, metric in (
        ("test_loss", "final", "test_loss"),
        ("test_acc1", "final", "test_acc1"),
        ("best_acc1", "best", "test_acc1"),
        ("best_epoch", "best", "epoch"),
    ):
        out[f"{name}_mean"], out[f"{name}_std"] = _mean_std([(r[part] or {}).get(metric) for r in done])
    for name in BATCHMEAN_METRICS:  # only when every run recorded it (older records lack it)
        values = [(r["final"] or {}).get(name) for r in done]
        out[f"{name}_mean"], out[f"{name}_std"] = _mean_std(values) if None not in values else (None, None)
    for name in ("params", "gflops", "gflops_profiler"):
        values = [r[name] for r in done if r.get(name) is not None]
        out[name] = values[0] if values else None
    last = [r["epochs"][-1].get("epoch") for r in done if r.get("epochs")]
    out["epoch"] = max((e for e in last if e is not None), default=None)  # E: the runs' final epoch
    return out


def at_epoch(record: Record, epoch: int) -> Record:
    """``record`` as it stood after ``epoch``: its first ``epoch`` epoch rows, with ``final`` and ``best``
    as the record would hold them had it ended there (:func:`~convnn.runs.records.summarize_epochs`); a
    run that never reached ``epoch`` counts as unfinished (status ``running``), one that reached it with
    finite test values as finished there."""
    rows = [e for e in record.get("epochs") or [] if isinstance(e.get("epoch"), int) and e["epoch"] <= epoch]
    last = rows[-1] if rows and rows[-1]["epoch"] == epoch else None
    if last is None or not all(math.isfinite(last.get(m, math.nan)) for m in ("test_loss", "test_acc1")):
        status = "diverged" if record.get("status") == "diverged" and last is not None else "running"
        return {**record, "status": status, "epochs": rows, "final": None, "best": None}
    final, best = summarize_epochs(rows)
    return {**record, "status": "finished", "epochs": rows, "final": final, "best": best}


def comparable(stats: Mapping[str, Any], metric: str) -> tuple[float | None, float | None]:
    """Mean and std over seeds of ``metric`` (``test_loss``, ``test_acc1``) as the paper's reference
    averaged it: the mean of per-batch means when the runs recorded it, else the per-image mean."""
    if stats.get(f"{metric}_batchmean_mean") is None:
        return stats[f"{metric}_mean"], stats[f"{metric}_std"]
    return stats[f"{metric}_batchmean_mean"], stats[f"{metric}_batchmean_std"]


def comparable_acc1(stats: Mapping[str, Any]) -> float | None:
    """The top-1 to compare with the paper: the mean of per-batch means (the reference's averaging)
    when the runs recorded it, else the per-image mean."""
    return comparable(stats, "test_acc1")[0]


def _paper_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def _diff(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def build_table(
    rows: Sequence[Mapping[str, str]],
    matched: Mapping[str, Sequence[Record]],
    accounting: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One dict per paper row: our seed statistics beside the paper's values (``None`` = missing).

    ``accounting`` (row id -> ``params``/``gflops``/``gflops_profiler``) replaces the records'
    accounting, so those columns regenerate without training.
    """
    lines = []
    for row in rows:
        stats = summarize(matched.get(row["row"], []))
        if accounting is not None:
            stats.update({k: accounting[row["row"]][k] for k in ("params", "gflops", "gflops_profiler")})
        paper_loss, paper_acc = _paper_float(row["test_loss"]), _paper_float(row["test_acc1"])
        stats["params"] = None if stats["params"] is None else int(stats["params"])
        lines.append(
            {
                "row": row["row"],
                "block": row["block"],
                "dataset": row["dataset"],
                "layer_type": row["layer_type"],
                **stats,
                "paper_test_loss": paper_loss,
                "paper_test_acc1": paper_acc,
                "diff_test_loss": _diff(stats["test_loss_mean"], paper_loss),
                "diff_test_acc1": _diff(comparable_acc1(stats), paper_acc),
                "paper_params_m": _paper_float(row["params_m"]),
                "paper_gflops": _paper_float(row["gflops"]),
                "paper_note": row["note"],
                **at_matched_epoch(row.get("authors_run") or None, stats),
            }
        )
    return lines


def at_matched_epoch(run: str | None, stats: Mapping[str, Any]) -> dict[str, Any]:
    """The authors' run ``run`` at our runs' final epoch E (``stats["epoch"]``) beside ours, for the test
    loss and top-1 (:func:`convnn.report.authors.compare_at`; ours as :func:`comparable`)."""
    out: dict[str, Any] = {"authors_run": run}
    for metric in ("test_loss", "test_acc1"):
        mean, std = comparable(stats, metric)
        cell = compare_at(run, stats["epoch"], metric, mean, std)
        out.update({f"{key}_{metric}": value for key, value in cell.items()})
    return out


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    """``"81.26 ± 0.31"``, ``"81.26"`` (one seed) or ``"missing"``."""
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _seeds(line: Mapping[str, Any]) -> str:
    """``"2 of 3"`` finished runs of the row, ``"0 of 2, 1 diverged"``; ``"0"`` without runs."""
    text = f"{line['n']} of {line['runs']}" if line["runs"] else "0"
    return text + (f", {line['diverged']} diverged" if line["diverged"] else "")


def _authors(line: Mapping[str, Any], metric: str, digits: int) -> str:
    """The authors' value at E ± its epoch noise; ``"no log"`` for a row without an authors' run."""
    if line["authors_run"] is None:
        return "no log"
    return _fmt(line[f"authors_{metric}"], line[f"authors_noise_{metric}"], digits)


def _gap(line: Mapping[str, Any], metric: str, digits: int) -> str:
    """``"-2.31 (u 1.80)"``: ours − authors at E and its uncertainty, flagged beyond ``2u``."""
    gap, u = line[f"gap_{metric}"], line[f"gap_u_{metric}"]
    if gap is None:
        return MISSING
    if u is None:
        return f"{gap:+.{digits}f}"
    return f"{gap:+.{digits}f} (u {u:.{digits}f}{', > 2u' if abs(gap) > 2 * u else ''})"


DISPLAY_COLUMNS: tuple[tuple[str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("Row", lambda r: r["row"]),
    ("Data", lambda r: r["dataset"]),
    ("Block", lambda r: r["block"]),
    ("Layer", lambda r: r["layer_type"]),
    ("Seeds", lambda r: _seeds(r)),
    ("Test loss", lambda r: _fmt(r["test_loss_mean"], r["test_loss_std"], 3)),
    ("Acc % (final)", lambda r: _fmt(r["test_acc1_mean"], r["test_acc1_std"])),
    (
        "Acc % (final, batch mean)",
        lambda r: _fmt(r["test_acc1_batchmean_mean"], r["test_acc1_batchmean_std"]),
    ),
    ("Acc % (best)", lambda r: _fmt(r["best_acc1_mean"], r["best_acc1_std"])),
    ("Paper loss", lambda r: _fmt(r["paper_test_loss"], digits=3)),
    ("Paper acc %", lambda r: _fmt(r["paper_test_acc1"])),
    ("Δ acc", lambda r: MISSING if r["diff_test_acc1"] is None else f"{r['diff_test_acc1']:+.2f}"),
    ("Epoch E", lambda r: MISSING if r["epoch"] is None else str(r["epoch"])),
    ("Authors loss @E", lambda r: _authors(r, "test_loss", 3)),
    ("Δ loss @E", lambda r: _gap(r, "test_loss", 3)),
    ("Authors acc % @E", lambda r: _authors(r, "test_acc1", 2)),
    ("Δ acc @E", lambda r: _gap(r, "test_acc1", 2)),
    ("Params", lambda r: MISSING if r["params"] is None else f"{r['params']:,}"),
    ("Paper params M", lambda r: _fmt(r["paper_params_m"], digits=3)),
    ("GFLOPs (profiler)", lambda r: _fmt(r["gflops_profiler"], digits=4)),
    ("Paper GFLOPS", lambda r: _fmt(r["paper_gflops"], digits=3)),
    ("GFLOPs (fvcore MACs)", lambda r: _fmt(r["gflops"], digits=4)),
    ("Paper note", lambda r: r["paper_note"]),
)


def display_table(lines: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column names and string cells of ``build_table``'s lines (missing cells say so)."""
    return [name for name, _ in DISPLAY_COLUMNS], [
        [cell(line) for _, cell in DISPLAY_COLUMNS] for line in lines
    ]


def to_markdown(names: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    rows = [names, ["---"] * len(names), *cells]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)


def to_latex(names: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A ``tabular`` (booktabs) with LaTeX special characters escaped."""

    def esc(text: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            text = text.replace(a, b)
        return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("λ", r"$\lambda$")

    body = [" & ".join(esc(c) for c in row) + r" \\" for row in cells]
    return "\n".join(
        [
            rf"\begin{{tabular}}{{{'l' * len(names)}}}",
            r"\toprule",
            " & ".join(esc(n) for n in names) + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            "",
        ]
    )


def describe_budget(records: Sequence[Record]) -> str:
    """One line naming the training budget the records used (name, epochs, batch, data subset, device)."""
    if not records:
        return "no runs"
    parts = set()
    for r in records:
        cfg = r.get("config", {})
        subset = cfg.get("data", {}).get("subset", {}) or {}
        parts.add(
            f"budget={r.get('budget')} (epochs={cfg.get('epochs')}, batch={cfg.get('batch_size')}, "
            f"train subset={subset.get('train') or 'all'}, test subset={subset.get('test') or 'all'}, "
            f"device={r.get('device')})"
        )
    return "; ".join(sorted(parts))


def render(
    table: str, lines: Sequence[Mapping[str, Any]], header: Sequence[str], out_dir: Path
) -> list[Path]:
    """Write ``<table>.md`` (header + table), ``<table>.csv`` (numbers, ``#`` header) and ``<table>.tex``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names, cells = display_table(lines)
    md = out_dir / f"{table}.md"
    md.write_text(
        "\n".join([f"# {table}: reproduced vs paper", "", *header, "", to_markdown(names, cells), ""])
    )
    csv_path = out_dir / f"{table}.csv"
    with open(csv_path, "w", newline="") as f:
        f.writelines(f"# {line}\n" for line in header)
        writer = csv.DictWriter(f, fieldnames=list(lines[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
    tex = out_dir / f"{table}.tex"
    tex.write_text("".join(f"% {line}\n" for line in header) + to_latex(names, cells))
    return [md, csv_path, tex]


def records_from_wandb(path: str, api: Any = None) -> list[Record]:
    """Records rebuilt from the runs of wandb project ``entity/project`` (:func:`records_from_runs`)."""
    return records_from_runs(_wandb_runs(path, api), f"{WANDB_PREFIX}{path}")


def records_from_runs(runs: Iterable[Any], source: str) -> list[Record]:
    """Records (the fields tables and figures read from ``results.json``) rebuilt from wandb runs as
    training logs them (:mod:`convnn.train.loggers`): ``wandb.Api`` runs or any objects with ``id``,
    ``state``, ``config``, ``summary`` and ``history(pandas=False)``.

    The config is the run's resolved config; ``params``, GFLOPs and ``device`` were logged once
    beside it (:data:`convnn.runs.records.LOGGED_ONCE`). The epochs are the history rows with a test
    top-1, by their logged ``epoch`` (a resumed run's repeated epoch keeps its last row); ``final`` and
    ``best`` come from them as a record's do (:func:`convnn.runs.records.summarize_epochs`). The status
    is the one training put in the summary, else the run's state (a run killed before it closed).
    """
    records = []
    for run in runs:
        config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        once = {k: config.pop(k, None) for k in LOGGED_ONCE}
        rows: dict[int, dict[str, Any]] = {}
        for h in run.history(pandas=False):
            if h.get("test/acc1") is None or h.get("epoch") is None:
                continue
            row = {f: h[logged_name(f)] for f in EPOCH_FIELDS if logged_name(f) in h}
            rows[int(h["epoch"])] = {**row, "epoch": int(h["epoch"])}
        epochs = [rows[e] for e in sorted(rows)]
        final, best = summarize_epochs(epochs)
        summary = dict(run.summary)
        records.append(
            {
                "status": summary.get("status") or run.state,
                "config": config,
                "run_dir": f"{source}/{run.id}",
                "seed": config.get("seed"),
                "budget": config.get("budget"),
                **once,
                "epochs": epochs,
                "final": final,
                "best": best,
                "wall_time_s": summary.get("wall_time_s"),
            }
        )
    return records


def _wandb_runs(path: str, api: Any) -> list[Any]:
    """The runs of wandb project ``path``; no credentials or no server is one ``ValueError`` line."""
    import wandb

    try:
        return list((api or wandb.Api()).runs(path))
    except (wandb.errors.UsageError, wandb.errors.CommError, wandb.errors.AuthenticationError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(
            f"cannot read wandb project {path!r} ({reason}); run `wandb login` or set WANDB_API_KEY"
        ) from None


def load_records(source: str) -> list[Record]:
    """Records under a local directory, or of a wandb project written ``wandb:entity/project``. An
    unreadable ``results.json`` is skipped with a one-line warning on stderr naming it."""
    if source.startswith(WANDB_PREFIX):
        return records_from_wandb(source[len(WANDB_PREFIX) :])
    if not Path(source).is_dir():
        raise ValueError(f"source {source!r} is neither a directory nor '{WANDB_PREFIX}entity/project'")
    skipped: list[str] = []
    records = collect_records(source, skipped)
    for message in skipped:
        print(f"convnn-tables: warning: skipped {message}", file=sys.stderr)
    return records


def setup_key(record: Record) -> str:
    """A short key of a record's training setup (:func:`convnn.runs.identity.setup_identity`)."""
    text = json.dumps(setup_identity(record.get("config") or {}), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def with_budget_label(records: Sequence[Record], budget: str | None) -> list[Record]:
    """The records whose budget label is ``budget`` (all when None); a label no record has is an
    error naming those present."""
    if budget is None:
        return list(records)
    labels = sorted({str(r.get("budget")) for r in records})
    if budget not in labels:
        raise ValueError(f"budget={budget!r} matches no record; the records' budgets: {labels}")
    return [r for r in records if str(r.get("budget")) == budget]


def select_budget(records: Sequence[Record], budget: str | None, setup: str | None = None) -> list[Record]:
    """Records of one training setup (effective budget, optimiser, schedule, precision...), never a mix.

    ``budget`` filters by the budget's label first (a label no record has is an error naming those
    present); ``setup`` picks one setup by its :func:`setup_key`. Several setups left raise a
    ``ValueError`` that lists them with the keys they differ in.
    """
    records = with_budget_label(records, budget)
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(setup_key(r), []).append(r)
    if setup is not None:
        if setup not in groups:
            raise ValueError(f"setup={setup!r} matches no record; setups: {sorted(groups)}")
        return groups[setup]
    if len(groups) <= 1:
        return list(records)
    first = setup_identity(next(iter(groups.values()))[0].get("config") or {})
    keys = sorted({k for g in groups.values() for k in identity_diff(first, setup_identity(g[0]["config"]))})
    described = [
        f"setup={key} (budget={g[0].get('budget')}: "
        + ", ".join(f"{k}={select(g[0]['config'], k)}" for k in keys)
        + f"; {len(g)} runs)"
        for key, g in sorted(groups.items())
    ]
    raise ValueError(
        f"the records mix {len(groups)} setups: {'; '.join(described)}; pick one with setup=<key>"
    )


def profile_rows(rows: Sequence[Mapping[str, str]]) -> dict[str, dict[str, Any]]:
    """Params and GFLOPs (both methods) of every row's network, built from its config, no training."""
    from convnn.models import build_from_config
    from convnn.models.accounting import profile_model

    out = {}
    for row in rows:
        cfg = compose_config(tuple(shlex.split(row["overrides"])))
        out[row["row"]] = profile_model(*build_from_config(cfg))
    return out


MATCHED_EPOCH_NOTE = (
    "At the matched epoch: E = the last epoch of our runs. 'Authors … @E' = the run behind this row in "
    "the authors' own per-epoch logs (the `authors_run` of results/paper/<table>.csv; "
    "results/paper/authors/, MIT, Copyright (c) 2024 and 2025 Mingi Kang): the paper's recipe at full "
    "width, one seed, its value after epoch E ± its epoch-to-epoch noise (the residual std of a "
    "least-squares quadratic over the 7 epochs around E). Δ @E = ours − authors, ours averaged as the "
    "authors' test numbers are (the mean of per-batch means where our runs recorded it; theirs at batch "
    "256); u = sqrt(our seeds' std² + their noise²) (one seed: ours taken as noisy as theirs); '> 2u' "
    "marks a gap beyond twice that. At another budget than the paper's (e.g. budget=mini: narrower "
    "networks, another recipe) the authors' columns still show the full-width paper recipe."
)


def display_source(source: str | None) -> str | None:
    """``source`` as output files name it: a wandb project or a relative folder as given, an absolute
    folder relative to the working directory (no machine path in a committed file)."""
    if source is None or source.startswith(WANDB_PREFIX) or not Path(source).is_absolute():
        return source
    return os.path.relpath(source)


def make_table(
    table: str,
    source: str | None,
    out_dir: Path = OUT_DIR,
    budget: str | None = None,
    profile: bool = False,
    dataset: str | None = None,
    note: str | None = None,
    setup: str | None = None,
    row_ids: Sequence[str] | None = None,
    epoch: int | None = None,
    loaded: Sequence[Record] | None = None,
) -> list[Path]:
    """Regenerate ``table`` (only ``dataset``'s rows when given, written as ``<table>-<dataset>``;
    only the rows ``row_ids`` when given) from the records in ``source`` (``loaded``: those records,
    read already) and/or by profiling into ``out_dir``; ``note`` joins the header. ``epoch``: every
    run as it stood after that epoch (written as ``<name>-epoch<N>``), compared with the authors' runs
    at that epoch."""
    rows = read_paper(table)
    if row_ids is not None:
        unknown = sorted(set(row_ids) - {r["row"] for r in rows})
        if unknown:
            raise ValueError(f"{table} has no rows {unknown}; rows: {[r['row'] for r in rows]}")
        rows = [r for r in rows if r["row"] in row_ids]
    if dataset is not None:
        datasets = sorted({r["dataset"] for r in rows})
        rows = [r for r in rows if r["dataset"] == dataset]
        if not rows:
            raise ValueError(f"{table} has no rows for dataset {dataset!r}; datasets: {datasets}")
    if loaded is None and source:
        loaded = load_records(source)
    records = with_budget_label(loaded, budget) if loaded is not None else []
    if epoch is not None:
        if epoch < 1:
            raise ValueError(f"epoch={epoch}; allowed: an epoch number >= 1")
        records = [at_epoch(r, epoch) for r in records]
    matched, unmatched = match_records(rows, records)
    # one setup among the runs of this table's rows (a source may hold other tables' runs too)
    chosen = {id(r) for r in select_budget([r for rs in matched.values() for r in rs], None, setup)}
    matched = {row: [r for r in rs if id(r) in chosen] for row, rs in matched.items()}
    used = [r for rs in matched.values() for r in rs]
    check_unique(used)
    lines = build_table(rows, matched, profile_rows(rows) if profile else None)
    given = {
        "table": table,
        "dataset": dataset,
        "source": display_source(source),
        "budget": budget,
        "epoch": epoch,
        "profile": profile or None,
    }
    command = " ".join(
        ["convnn-tables", *(f"{k}={str(v).lower() if v is True else v}" for k, v in given.items() if v)]
    )
    header = [
        made_by(command),
        f"Budget: {describe_budget(used)}.",
        f"Runs: {len(records)} records read, {len(used)} matched to paper rows "
        f"({sum(line['incomplete'] for line in lines)} of them not finished, "
        f"{sum(line['diverged'] for line in lines)} diverged), {len(unmatched)} unmatched; "
        f"{sum(line['n'] > 0 for line in lines)} of {len(lines)} rows have finished runs.",
        *([f"Note: {note}"] if note else []),
        *(
            [
                f"At epoch {epoch}: every run as it stood after epoch {epoch} (later epochs left out), "
                f"so 'final' below is epoch {epoch}."
            ]
            if epoch is not None
            else []
        ),
        "Ours: final-epoch test values, mean ± sample std over seeds (n = finished seeds); best = best-epoch "
        "top-1. 'batch mean': the mean of per-batch means, as the paper's reference averaged its test "
        "metrics (a short last batch weighs as much as a full one). Paper: the table as printed (one run, "
        "final epoch); 'Paper note' flags misprints and repeated cells. Δ acc = ours (batch mean where "
        "recorded, else per image) − paper. 'missing' = no run (never filled in).",
        "Params/GFLOPs: "
        + ("measured now from each row's config (no training)" if profile else "from the runs")
        + "; 'profiler' is the paper's torch.profiler method, 'fvcore' counts multiply-adds.",
        MATCHED_EPOCH_NOTE,
    ]
    name = table if dataset is None else f"{table}-{dataset}"
    return render(name if epoch is None else f"{name}-epoch{epoch}", lines, header, out_dir)

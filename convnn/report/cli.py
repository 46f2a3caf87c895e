"""``convnn-tables``: regenerate the paper's tables and figures from run records, beside the paper.

Records (``results.json``, see :mod:`convnn.runs.records`) come from a local folder or a wandb
project; ``source`` defaults to the runs folder of the experiment behind the table or figure
(``<out_dir>/paper/table1`` for ``table=table1``, ``out_dir`` as in ``convnn-train``). Each paper row
(``results/paper/<table>.csv``) is matched to the records whose resolved ``model``, ``layer``,
``data.name`` and ``optim.lr`` equal those Hydra composes from the row's overrides; matched runs are
averaged over seeds (one run recorded twice stops it, naming both directories). Missing cells stay
missing. Nothing here trains.

    convnn-tables table=table1                       # runs/paper/table1 -> results/reproduced/table1.*
    convnn-tables table=all source=wandb:<entity>/convnn
    convnn-tables figure=fig4                        # runs/paper/fig4 -> results/reproduced/fig4.png
    convnn-tables export=runs/mini                   # -> results/reproduced/mini/records/
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from convnn.cli import examples, experiments, fail, help_page
from convnn.report.claims import REPRODUCTIONS, make_claims
from convnn.report.export import export_records
from convnn.report.figures import FIGURES, make_figure
from convnn.report.tables import (
    OUT_DIR,
    TABLES,
    WANDB_PREFIX,
    load_records,
    make_table,
    match_records,
    read_paper,
    select_budget,
)
from convnn.runs.errors import unwritable

PROG = "convnn-tables"
ALL = "all"
DATASETS = ("cifar10", "cifar100", "imagenet")
OPTIONS = {
    "table": f"{', '.join(TABLES)}, or {ALL}: every table whose runs are present",
    "figure": ", ".join(FIGURES),
    "claims": f"{', '.join(REPRODUCTIONS)}: the paper's claims judged on a reproduction's runs, with its "
    "tables and figures",
    "export": "a runs folder: copy its run records (results.json only, no machine paths) to out "
    f"(default {OUT_DIR}/<runs folder name>/records)",
    "source": f"the runs: a folder of run records (results.json, found at any depth) or "
    f"{WANDB_PREFIX}<entity>/<project>; default: <out_dir>/<experiment> (the list below)",
    "out_dir": "where convnn-train wrote the runs, as its out_dir ($CONVNN_RUNS_DIR, else runs)",
    "out": f"where the tables and figures go ({OUT_DIR}; claims: {OUT_DIR}/<reproduction>)",
    "budget": "only the runs with this budget label (smoke, mini, early, full, ...)",
    "setup": "the training setup to show when the runs mix several (the error lists their keys)",
    "profile": "true: params and GFLOPs measured from each row's config (runs not needed)",
    "dataset": f"only this dataset's rows ({', '.join(DATASETS)}), written as <table>-<dataset>",
    "epoch": "tables: every run as it stood after this epoch (N >= 1), beside the authors' runs at N, "
    "written as <table>-epoch<N>",
    "note": "a line added to the header of what is written",
}
EXAMPLES = (
    "convnn-tables table=table1",
    f"convnn-tables table={ALL} source={WANDB_PREFIX}<entity>/convnn",
    "convnn-tables table=table2 dataset=cifar10 profile=true",
)
CHOICES = {  # the keys whose value is one of a list
    "table": (*TABLES, ALL),
    "figure": tuple(FIGURES),
    "claims": tuple(REPRODUCTIONS),
    "profile": ("true", "false"),
    "dataset": DATASETS,
}
FIGURE_RUNS = {"fig3": "paper/table1", "fig6": "paper/table2"}  # drawn from a table's runs


def runs_of(kind: str, name: str) -> str:
    """The experiment folder (under ``out_dir``) whose runs ``kind=name`` reads by default."""
    if kind == "claims":
        return REPRODUCTIONS[name].name
    return FIGURE_RUNS.get(name, f"paper/{name}") if kind == "figure" else f"paper/{name}"


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """``key=value`` arguments, checked: unknown keys, repeated keys and unknown names raise a
    ``ValueError`` naming what is allowed."""
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"bad argument {arg!r}; expected key=value with key in {list(OPTIONS)}")
        if key in args:
            raise ValueError(f"{key}= given twice ({args[key]!r} and {value!r})")
        args[key] = value
    if sum(k in args for k in ("table", "figure", "claims", "export")) != 1:
        raise ValueError(
            "give exactly one of table=<name>, figure=<name>, claims=<reproduction> or export=<runs dir>"
        )
    for key, allowed in CHOICES.items():
        if key in args and args[key] not in allowed:
            raise ValueError(f"{key}={args[key]!r}; allowed: {', '.join(allowed)}")
    if "epoch" in args and not (args["epoch"].isdigit() and int(args["epoch"]) >= 1):
        raise ValueError(f"epoch={args['epoch']!r}; allowed: an epoch number >= 1")
    if "epoch" in args and "table" not in args:
        raise ValueError("epoch= applies to tables only (table=<name>)")
    return args


def help_text() -> str:
    """The ``--help`` page: options, what each table / figure / claims reads by default, examples."""
    described = dict(experiments())
    made = [(f"table={t}", f"{runs_of('table', t)}: {described[runs_of('table', t)]}") for t in TABLES]
    made += [(f"figure={f}", f"{runs_of('figure', f)}: {spec.title}") for f, spec in FIGURES.items()]
    made += [
        (f"claims={c}", f"{runs_of('claims', c)}: tables {', '.join(r.tables)} and figures "
         f"{', '.join(r.figures)} at budget={r.budget}, and the paper's claims judged on them")
        for c, r in REPRODUCTIONS.items()
    ]  # fmt: skip
    return help_page(
        PROG,
        "regenerate the paper's tables (md, csv, tex) and figures (png) from run records, beside the "
        "paper's numbers; nothing trains.",
        f"{PROG} table=<name>|figure=<name>|claims=<name>|export=<runs> [key=value ...]",
        [
            ("Options (key=value)", list(OPTIONS.items())),
            ("Tables, figures and claims (and the runs each reads: <out_dir>/<folder>)", made),
            ("Examples", examples(EXAMPLES)),
        ],
    )


def completion_script() -> str:
    """A bash completion for ``convnn-tables``: the keys, the names of tables / figures / claims and
    the choices, folders for ``source=``, ``out=`` and ``out_dir=`` (``eval`` its output)."""
    words = [f"{k}=" for k in OPTIONS if k not in CHOICES]
    words += [f"{k}={v}" for k, values in CHOICES.items() for v in values]
    return f"""_convnn_tables() {{
    local word=${{COMP_LINE:0:COMP_POINT}} prefix=
    word=${{word##* }}
    [[ $word == *=* && $COMP_WORDBREAKS != *=* ]] && prefix=${{word%%=*}}=
    case $word in
        source=*|out=*|out_dir=*|export=*) COMPREPLY=($(compgen -d -S / -- "${{word#*=}}")) ;;
        *=*) COMPREPLY=($(compgen -W "{" ".join(words)}" -- "$word")); COMPREPLY=("${{COMPREPLY[@]#*=}}") ;;
        *) COMPREPLY=($(compgen -W "{" ".join(words)}" -- "$word")); prefix= ;;
    esac
    [[ -n $prefix ]] && COMPREPLY=("${{COMPREPLY[@]/#/$prefix}}")
    return 0
}}
complete -o nospace -F _convnn_tables {PROG}"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``convnn-tables``; a bad argument or source exits with a one-line error (status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text())
        return
    if argv[:1] in (["-sc"], ["--shell-completion"]):
        if argv[1:] != ["install=bash"]:
            raise fail(PROG, f"{shlex.join(argv)}: allowed: -sc install=bash")
        print(completion_script())
        return
    try:
        for path in run(argv):
            print(path)
    except ValueError as e:
        raise fail(PROG, str(e)) from None


def runs_root(args: dict[str, str]) -> Path:
    """Where ``convnn-train`` put the runs: ``out_dir=``, else ``$CONVNN_RUNS_DIR``, else ``runs``."""
    return Path(args.get("out_dir") or os.environ.get("CONVNN_RUNS_DIR") or "runs")


def default_source(kind: str, name: str, args: dict[str, str], needed: bool = True) -> str | None:
    """``source=`` or the experiment's runs folder under ``out_dir``; a missing folder is an error when
    the runs are ``needed`` (else ``None``: no runs)."""
    if "source" in args:
        return args["source"]
    folder = runs_root(args) / runs_of(kind, name)
    if folder.is_dir():
        return str(folder)
    if not needed:
        return None
    raise ValueError(
        f"no runs folder {folder} (the runs of {kind}={name}); give source=<run folder or "
        f"{WANDB_PREFIX}entity/project> or out_dir=<convnn-train's out_dir>"
        + (", or profile=true for the params and GFLOPs columns alone" if kind == "table" else "")
    )


def run(argv: Sequence[str]) -> list[Path]:
    """Make the tables, figure or claims ``argv`` asks for; the written paths."""
    args = parse_args(argv)
    if "export" in args:
        default = OUT_DIR / Path(args["export"]).resolve().name / "records"
        return export_records(args["export"], Path(args.get("out", default)))
    out = Path(args["out"]) if "out" in args else None
    problem = unwritable(out or OUT_DIR)
    if problem:
        raise ValueError(f"out={str(out or OUT_DIR)!r} is not writable ({problem})")
    if "claims" in args:
        name = args["claims"]
        return make_claims(name, default_source("claims", name, args), out, args.get("note"))
    if "figure" in args:
        name = args["figure"]
        source = default_source("figure", name, args)
        records = select_budget(load_records(source), args.get("budget"), args.get("setup"))
        given = {k: args[k] for k in ("budget", "setup") if k in args}
        command = shlex.join(
            [PROG, f"figure={name}", f"source={source}", *(f"{k}={v}" for k, v in given.items())]
        )
        return [make_figure(name, records, out or OUT_DIR, source, args.get("note"), command)]
    if args["table"] != ALL:
        table = args["table"]
        return _table(table, default_source("table", table, args, needed=args.get("profile") != "true"), args)
    written = []
    for table in TABLES:
        source = default_source("table", table, args, needed=False)
        if _has_runs(table, source, args):
            written += _table(table, source, args)
        else:
            where = source or runs_root(args) / runs_of("table", table)
            print(f"{PROG}: no runs of {table} in {where}; skipped", file=sys.stderr)
    if not written:
        raise ValueError(f"table={ALL}: no runs of any table ({', '.join(TABLES)}) found")
    return written


def _has_runs(table: str, source: str | None, args: dict[str, str]) -> bool:
    """Whether ``source`` holds runs of ``table`` (of ``dataset=``'s rows when given): for the
    experiment's own folder any run record; for a ``source=`` of several tables a run that matches
    one of its rows."""
    rows = [r for r in read_paper(table) if args.get("dataset") in (None, r["dataset"])]
    if source is None or not rows:
        return False
    if "source" not in args:
        return any(Path(source).rglob("results.json"))
    matched, _ = match_records(rows, load_records(source))
    return any(matched.values())


def _table(table: str, source: str | None, args: dict[str, str]) -> list[Path]:
    return make_table(
        table,
        source,
        Path(args.get("out", OUT_DIR)),
        budget=args.get("budget"),
        profile=args.get("profile") == "true",
        dataset=args.get("dataset"),
        note=args.get("note"),
        setup=args.get("setup"),
        epoch=int(args["epoch"]) if "epoch" in args else None,
    )

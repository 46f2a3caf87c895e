"""``convnn-tables``: regenerate a paper table from run records, side by side with the paper.

Records (``results.json``, see :mod:`convnn.runs.records`) come from a local directory or a wandb
project. Each paper row (``results/paper/<table>.csv``) is matched to the records whose resolved
``model``, ``layer``, ``data.name`` and ``optim.lr`` equal those Hydra composes from the row's
overrides; matched runs are averaged over seeds. Missing cells stay missing. Nothing here trains.

    convnn-tables table=table1 source=runs/paper/table1            # -> results/reproduced/table1.{md,csv,tex}
    convnn-tables table=table2 profile=true                        # params / GFLOPs columns, no training
    convnn-tables figure=fig4 source=runs/paper/fig4               # -> results/reproduced/fig4.png
    convnn-tables claims=mini source=runs/mini                     # -> results/reproduced/mini/ (+ claims.md)
    convnn-tables export=runs/mini                                 # -> results/reproduced/mini/records/
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from convnn.report.claims import make_claims
from convnn.report.export import export_records
from convnn.report.figures import make_figure
from convnn.report.tables import OUT_DIR, load_records, make_table, select_budget

ARGUMENTS = (
    *("table", "figure", "claims", "export"),  # what to make: exactly one
    *("source", "out", "budget", "setup", "profile", "dataset", "note"),
)


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """``key=value`` arguments; unknown keys raise a ``ValueError`` listing the known ones."""
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ARGUMENTS:
            raise ValueError(f"bad argument {arg!r}; expected key=value with key in {list(ARGUMENTS)}")
        args[key] = value
    if sum(k in args for k in ("table", "figure", "claims", "export")) != 1:
        raise ValueError(
            "give exactly one of table=<name>, figure=<name>, claims=<reproduction> or export=<runs dir>"
        )
    if args.get("profile", "false") not in ("true", "false"):
        raise ValueError(f"profile={args['profile']!r}; allowed: true, false")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``convnn-tables``; a bad argument or source exits with a one-line error (status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return
    try:
        for path in run(argv):
            print(path)
    except ValueError as e:
        print(f"convnn-tables: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: Sequence[str]) -> list[Path]:
    """Make the table or figure ``argv`` asks for; the written paths."""
    args = parse_args(argv)
    if "export" in args:
        default = OUT_DIR / Path(args["export"]).resolve().name / "records"
        return export_records(args["export"], Path(args.get("out", default)))
    if "claims" in args:
        if "source" not in args:
            raise ValueError("claims need source=<run dir or wandb:entity/project>")
        out = args.get("out")
        return make_claims(args["claims"], args["source"], Path(out) if out else None, args.get("note"))
    out_dir = Path(args.get("out", OUT_DIR))
    if "figure" in args:
        if "source" not in args:
            raise ValueError("figures need source=<run dir or wandb:entity/project>")
        records = select_budget(load_records(args["source"]), args.get("budget"), args.get("setup"))
        return [make_figure(args["figure"], records, out_dir, args["source"], args.get("note"))]
    return make_table(
        args["table"],
        args.get("source"),
        out_dir,
        budget=args.get("budget"),
        profile=args.get("profile") == "true",
        dataset=args.get("dataset"),
        note=args.get("note"),
        setup=args.get("setup"),
    )

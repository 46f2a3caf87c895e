"""Derive ``results/paper/authors/epoch_times.csv`` from the authors' logs (``runs.csv``, ``curves.csv``).

One row per logged run: its folder, set, dataset, logged epochs, the median of its epoch times
(``time_s``, their A100) and its cost key (:func:`convnn.runs.cost.layer_key`) in our config's terms,
which is what ``convnn.runs.cost`` matches a job against. The runs' own arguments are translated:
``Branching`` with ``branch_ratio`` -> ``layer=branching layer.ratio``; similarity / aggregation type
``Loc_Col`` -> ``select_by=both`` / ``aggregate_position=true``; ``shuffle_scale`` -> ``patch``; the
VGG ``spatial`` sample count is the grid side (ours: ``num_candidates`` = side squared);
``convolution_type`` -> ConvNN-attention ``aggregation``.

Left out: ``Conv_test---``'s depthwise ConvNN-attention runs. They repeat ``K_test_correct---``'s
arguments (Table 5's D cell comes from the latter) at twice its epoch time, as if the GPU was shared.

    python scripts/derive_epoch_times.py [--logs results/paper/authors]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's convnn, installed or not

from convnn.paths import PAPER_DIR  # noqa: E402
from convnn.provenance import made_by, script_command  # noqa: E402
from convnn.runs.cost import EPOCH_TIMES, KEY_TYPES, layer_key  # noqa: E402

VIT_LAYERS = {
    "Attention": "attention",
    "LocalAttention": "local_attention",
    "KvtAttention": "kvt_attention",
    "SparseAttention": "sparse_attention",
    "ConvNNAttention": "convnn_attention",
}
AGGREGATIONS = {"depthwise": "depthwise", "depthwise-separable": "separable", "standard": "standard"}
LEFT_OUT = {("Conv_test---", "depthwise")}


def our_layer(args: dict[str, str]) -> tuple[str, dict[str, object]]:
    """``(model, layer config)`` in our terms for one run's ``args.txt`` (a row of ``runs.csv``)."""
    samples = int(args["num_samples"])
    if args["model"] == "vgg11":
        sampling = args["sampling_type"]
        count = samples * samples if sampling == "spatial" else samples
        return "vgg11", {
            "name": "branching",
            "ratio": float(args["branch_ratio"]),
            "kernel_size": int(args["kernel_size"]),
            "k": int(args["K"]),
            "sampling": sampling,
            "num_candidates": None if sampling == "all" else count,
            "select_by": "both" if args["similarity_type"] == "Loc_Col" else "features",
            "aggregate_position": args["aggregation_type"] == "Loc_Col",
            "patch": int(args["shuffle_scale"]) or 1,
        }
    layer: dict[str, object] = {"name": VIT_LAYERS[args["layer"]], "heads": int(args["num_heads"] or 1)}
    if args["layer"] in ("KvtAttention", "ConvNNAttention"):
        layer["k"] = int(args["K"])
    if args["layer"] == "SparseAttention":
        layer["mode"] = args["sparse_mode"]
    if args["layer"] == "ConvNNAttention":
        layer.update(
            sampling=args["sampling_type"],
            num_candidates=None if args["sampling_type"] == "all" else samples,
            aggregation=AGGREGATIONS[args["convolution_type"]],
        )
    return "vit_tiny", layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=PAPER_DIR / "authors")
    parser.add_argument("--out", type=Path, default=EPOCH_TIMES)
    args = parser.parse_args()
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    with (args.logs / "curves.csv").open() as f:
        for row in csv.DictReader(f):
            times[row["repo"], row["run"]].append(float(row["time_s"]))
    rows = []
    with (args.logs / "runs.csv").open() as f:
        for run in csv.DictReader(f):
            run_set = run["run"].split("/")[1]
            if (run_set, run["convolution_type"]) in LEFT_OUT:
                continue
            key = layer_key(*our_layer(run))
            assert key is not None, run["run"]
            logged = times[run["repo"], run["run"]]
            rows.append(
                {
                    "run": run["run"],
                    "set": run_set,
                    "dataset": run["dataset"],
                    "epochs": len(logged),
                    "epoch_s": f"{statistics.median(logged):.2f}",
                    **{k: "" if v is None else v for k, v in key.items()},
                }
            )
    columns = ["run", "set", "dataset", "epochs", "epoch_s", *KEY_TYPES]
    tmp = args.out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        f.write(f"# {made_by(script_command())}\n")
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["run"]))
    tmp.replace(args.out)
    print(f"{args.out}: {len(rows)} runs")


if __name__ == "__main__":
    main()

"""The paper's figures from run records, as PNG (matplotlib): loss curves (Figures 3, 6, 10) and
k / r sweeps (Figures 4, 5, 7, 8). Records are picked by their resolved config (dotted paths), so a
figure reads the directory of its own sweep (``runs/paper/fig4``; Figures 3 and 6 read Table 1's and
Table 2's). Sweep figures plot the best-epoch test top-1 (as the paper's figures do), mean ± std
over seeds; loss curves the per-epoch mean over seeds.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from convnn.provenance import made_by  # noqa: E402
from convnn.report.authors import curve, read_runs  # noqa: E402
from convnn.report.tables import display_source  # noqa: E402
from convnn.runs.identity import select as lookup  # noqa: E402 - config["a"]["b"] for "a.b", None if missing
from convnn.runs.records import check_unique  # noqa: E402

Record = dict[str, Any]
SMOOTH_WINDOW = 10  # the paper's moving average for loss curves


@dataclass(frozen=True)
class Series:
    """Records whose config matches ``match`` (dotted path -> value). ``x``: the swept path (``None``:
    a horizontal baseline); ``square``: plot ``x**2`` (a kernel size as a neighbour count); ``root``:
    plot ``sqrt(x)`` (a candidate count r^2 as the paper's r). ``authors``: the authors' runs of the
    series, ``(x position, run name)`` (one entry, any position, for a curve or a baseline); the name's
    ``{data}`` and ``{lr}`` are filled from the panel (``CIFAR10``, ``1e-4``)."""

    label: str
    match: Mapping[str, Any]
    x: str | None = None
    square: bool = False
    root: bool = False
    authors: tuple[tuple[float, str], ...] = ()

    def position(self, value: float) -> float:
        """Where a swept ``value`` goes on the x axis."""
        return value**2 if self.square else math.sqrt(value) if self.root else value


@dataclass(frozen=True)
class Figure:
    """``kind`` is ``"sweep"`` (accuracy vs ``x``) or ``"loss"`` (curves); one panel per ``facets`` value.
    ``cost``: a second row of panels with each series' GFLOPs (fvcore and the paper's profiler method)."""

    kind: str
    title: str
    series: tuple[Series, ...]
    xlabel: str = "epoch"
    facets: tuple[str, ...] = ("data.name",)
    cost: bool = False


# The authors' runs behind each series (results/paper/authors/runs.csv; see convnn.report.authors).
BR_RUN = "Final_Output/BR_test_cos---/VGG11-{{data}}/BranchingConvNN_All_K9_Col_Col_br{}_s42"
LR_RUN = "Final_Output/loss_test_cos_first---/VGG11-{{data}}/lr_{}/BranchingConvNN_K9_col_col_br{}_s42"
K_RUN = "Final_Output/K_test_pt4---/VGG11-{{data}}/BranchingConvNN_K{}_KS{}_col_col_br{}_s0"
N_RUN = "Final_Output/N_test_cos---/VGG11-{{data}}/BranchingConvNN_{}_NS{}_col_col_br{}_s42"
VIT_RUN = "Final_Output/{}/ViT-Tiny-{{data}}/{}_s42"
ATTENTION_RUN = ((0.0, VIT_RUN.format("Baseline_Test---", "Attention_NH1")),)
VIT_ALL_RUN = ((0.0, VIT_RUN.format("K_test_correct---", "ConvNNAttention_K9")),)
VIT_K = (*range(1, 13), 16, 25, 36)


def _vgg_rows(run: Callable[[str], str]) -> tuple[Series, ...]:
    """Conv2D, branching λ = 0.5 and ConvNN without positional encoding, with the authors' runs
    ``run(br)`` (``br``: λ's digits, ``"0500"``)."""
    return tuple(
        Series(
            label,
            {"layer.ratio": ratio, "layer.select_by": "features"},
            authors=((0.0, run(br)),),
        )
        for label, ratio, br in (
            ("Conv2D", 0.0, "0000"),
            ("Branching (λ=0.5)", 0.5, "0500"),
            ("ConvNN", 1.0, "1000"),
        )
    )


FIGURES: dict[str, Figure] = {
    # Figure 3 is drawn from Table 1's runs: the authors' runs of the same rows (the paper's own Figure 3
    # plotted a second run of each, loss_test_cos_first---/lr_1e-4, with the same arguments)
    "fig3": Figure("loss", "VGG-11 loss and test top-1", _vgg_rows(BR_RUN.format)),
    "fig4": Figure(
        "sweep",
        "VGG-11: number of neighbours k",
        (
            *(
                Series(
                    f"Branching (λ=0.5), conv kernel {size}",
                    {"layer.ratio": 0.5, "layer.kernel_size": size},
                    x="layer.k",
                    authors=tuple((float(k), K_RUN.format(k, size, "0500")) for k in range(1, 13)),
                )
                for size in (1, 2, 3)
            ),
            Series(
                "Conv2D, kernel size²",
                {"layer.ratio": 0.0},
                x="layer.kernel_size",
                square=True,
                authors=tuple((float(size**2), K_RUN.format(0, size, "0000")) for size in (1, 2, 3)),
            ),
        ),
        xlabel="k (neighbours)",
    ),
    "fig5": Figure(
        "sweep",
        "VGG-11: candidates r (r² random / r x r spatial grid)",
        tuple(
            Series(label, {"layer.ratio": ratio, "layer.sampling": sampling}, **sweep)
            for ratio, name, br in ((0.5, "Branching (λ=0.5)", "0500"), (1.0, "ConvNN", "1000"))
            for label, sampling, sweep in (
                *(
                    (
                        f"{name}, {sampling}",
                        sampling,
                        {
                            "x": "layer.num_candidates",
                            "root": True,
                            "authors": tuple(
                                (float(r), N_RUN.format(sampling, r, br)) for r in range(4, 33, 2)
                            ),
                        },
                    )
                    for sampling in ("random", "spatial")
                ),
                (f"{name}, all candidates", "all", {"authors": ((0.0, BR_RUN.format(br)),)}),
            )
        )
        + (Series("Conv2D", {"layer.ratio": 0.0}, authors=((0.0, BR_RUN.format("0000")),)),),
        xlabel="r",
        cost=True,
    ),
    "fig6": Figure(
        "loss",
        "ViT-Tiny loss and test top-1",
        (
            Series("Attention", {"layer.name": "attention"}, authors=ATTENTION_RUN),
            Series(
                "ConvNN (random, r=32)",
                {"layer.name": "convnn_attention", "layer.sampling": "random"},
                authors=((0.0, VIT_RUN.format("N_test_correct---", "ConvNNAttention_K9_N32_random")),),
            ),
        ),
    ),
    "fig7": Figure(
        "sweep",
        "ViT-Tiny: number of neighbours k",
        (
            Series(
                "ConvNN (all)",
                {"layer.name": "convnn_attention", "layer.sampling": "all"},
                x="layer.k",
                authors=tuple(
                    (float(k), VIT_RUN.format("K_test_correct---", f"ConvNNAttention_K{k}")) for k in VIT_K
                ),
            ),
            Series(
                "ConvNN (random)",
                {"layer.name": "convnn_attention", "layer.sampling": "random"},
                x="layer.k",
                authors=tuple(
                    (float(k), VIT_RUN.format("K_test_correct---", f"ConvNNAttention_Random_K{k}_NS32"))
                    for k in range(1, 13)
                ),
            ),
            Series(
                "KVT",
                {"layer.name": "kvt_attention"},
                x="layer.k",
                authors=tuple(
                    (float(k), VIT_RUN.format("K_test_correct---", f"KvtAttention_K{k}"))
                    for k in (*VIT_K, 100)
                ),
            ),
            Series("Attention", {"layer.name": "attention"}, authors=ATTENTION_RUN),
        ),
        xlabel="k (neighbours)",
    ),
    "fig8": Figure(
        "sweep",
        "ViT-Tiny ConvNN-attention: candidates r",
        (
            *(
                Series(
                    label,
                    {"layer.name": "convnn_attention", "layer.sampling": sampling},
                    x="layer.num_candidates",
                    authors=tuple(
                        (float(r), VIT_RUN.format("N_test_correct---", f"ConvNNAttention_K9_N{r}_{sampling}"))
                        for r in range(16, 193, 16)
                    ),
                )
                for label, sampling in (("Random", "random"), ("Spatial", "spatial"))
            ),
            Series(
                "All candidates",
                {"layer.name": "convnn_attention", "layer.sampling": "all"},
                authors=VIT_ALL_RUN,
            ),
            Series("Attention", {"layer.name": "attention"}, authors=ATTENTION_RUN),
        ),
        xlabel="r (candidates)",
        cost=True,
    ),
    "fig10": Figure(
        "loss",
        "VGG-11 learning rates: loss and test top-1",
        tuple(
            Series(s.label, {"layer.ratio": s.match["layer.ratio"]}, authors=s.authors)
            for s in _vgg_rows(lambda br: LR_RUN.format("{lr}", br))
        ),
        facets=("optim.lr", "data.name"),
    ),
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def select(records: Sequence[Record], match: Mapping[str, Any]) -> list[Record]:
    """Finished records whose config has every ``match`` value."""
    return [
        r
        for r in records
        if r.get("status") == "finished"
        and all(_same(lookup(r.get("config", {}), k), v) for k, v in match.items())
    ]


def sweep_points(
    records: Sequence[Record], series: Series, metric: str = "best.test_acc1"
) -> list[tuple[float, float, float, int]]:
    """``(x, mean, std, n)`` of the record's ``metric`` (a dotted path: the best-epoch test top-1,
    ``gflops``, ``gflops_profiler``) per swept value (std 0 for one seed)."""
    groups: dict[float, list[float]] = {}
    for r in select(records, series.match):
        x = lookup(r["config"], series.x) if series.x else 0.0
        value = lookup(r, metric)
        if x is None or value is None:
            continue
        groups.setdefault(series.position(float(x)), []).append(value)
    return [
        (x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for x, v in sorted(groups.items())
    ]


def smooth(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Trailing moving average over up to ``window`` values (the paper smooths with window 10);
    curves no longer than ``window`` are returned as they are."""
    if len(values) <= window:
        return list(values)
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def mean_curve(records: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """Epochs and the per-epoch mean of ``key`` (e.g. ``test_loss``) over the records' seeds."""
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        for row in r.get("epochs") or []:
            if row.get(key) is not None:
                by_epoch.setdefault(int(row["epoch"]), []).append(row[key])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def _facet_values(records: Sequence[Record], facets: Sequence[str]) -> list[tuple[Any, ...]]:
    values = {tuple(lookup(r.get("config", {}), f) for f in facets) for r in records}
    return sorted(values, key=lambda v: tuple(str(x) for x in v))


COST_METRICS = (("gflops", "-", "fvcore"), ("gflops_profiler", "--", "profiler"))


def _draw_sweep(
    ax: Any, records: Sequence[Record], spec: Figure, metrics: Sequence[tuple[str, str, str]]
) -> None:
    """Every series of ``spec`` on ``ax``: ``(metric, line style, label suffix)`` per metric."""
    for i, series in enumerate(spec.series):
        for metric, style, suffix in metrics:
            points = sweep_points(records, series, metric)
            if not points:
                continue
            label = f"{series.label} ({suffix})" if suffix else series.label
            if series.x is None:
                _, mean, _, n = points[0]
                ax.axhline(mean, color=f"C{i}", ls=":", label=f"{label} ({mean:.3g}, n={n})")
                continue
            xs, means, stds, _ = zip(*points, strict=True)
            ax.errorbar(xs, means, yerr=stds, ls=style, marker="o", capsize=3, color=f"C{i}", label=label)


def authors_points(
    records: Sequence[Record], series: Series, panel: Mapping[str, Any], epoch: int | None
) -> list[tuple[float, float]]:
    """``(x, best test top-1 over the authors' epochs 1..epoch)`` of ``series``' authors' runs at the x
    positions where ``records`` have points (all of the run for ``epoch`` None); a run the panel's
    dataset has no log of is left out."""
    ours = {x for x, *_ in sweep_points(records, series)}
    points = []
    for x, template in series.authors:
        run = authors_run(template, panel)
        if run is None or (series.x is not None and x not in ours) or (series.x is None and not ours):
            continue
        values = curve(run, "test_acc1")
        points.append((0.0 if series.x is None else x, max(values[: epoch or len(values)])))
    return points


def _draw_authors_sweep(
    ax: Any, records: Sequence[Record], spec: Figure, panel: Mapping[str, Any], epoch: int | None
) -> None:
    """The authors' points of every series (dashed, open markers, the series' colour)."""
    for i, series in enumerate(spec.series):
        points = authors_points(records, series, panel, epoch)
        if not points:
            continue
        if series.x is None:
            ax.axhline(
                points[0][1], color=f"C{i}", ls="--", label=f"{series.label}, authors ({points[0][1]:.3g})"
            )
            continue
        xs, values = zip(*points, strict=True)
        ax.plot(xs, values, ls="--", marker="o", mfc="none", color=f"C{i}", label=f"{series.label}, authors")


CURVE_ROWS = (("train_loss", "train loss"), ("test_loss", "test loss"), ("test_acc1", "test top-1 (%)"))


def _draw_curves(
    ax: Any, records: Sequence[Record], spec: Figure, key: str, panel: Mapping[str, Any], epoch: int | None
) -> None:
    """``key``'s per-epoch curve of every series (mean over seeds; losses smoothed as the paper's), and
    the series' authors' run (dashed, same colour) over epochs 1..``epoch``. Top-1 is ours as the
    authors averaged it (the per-batch mean) where every run recorded it."""
    for i, series in enumerate(spec.series):
        chosen = select(records, series.match)
        ours_key = key
        batchmean = f"{key}_batchmean"
        if key == "test_acc1" and chosen and all(batchmean in (r.get("epochs") or [{}])[-1] for r in chosen):
            ours_key = batchmean
        epochs, values = mean_curve(chosen, ours_key)
        if not epochs:  # no runs of this series: no line, no legend entry
            continue
        ax.plot(
            epochs,
            values if key == "test_acc1" else smooth(values),
            "-",
            color=f"C{i}",
            label=series.label,
            marker="o" if len(epochs) == 1 else None,  # a single epoch is a point, not a line
        )
        run = authors_run(series.authors[0][1], panel) if series.authors else None
        if run is None:
            continue
        theirs = list(curve(run, key)[:epoch])
        ax.plot(
            range(1, len(theirs) + 1),
            theirs if key == "test_acc1" else smooth(theirs),
            "--",
            color=f"C{i}",
            label=f"{series.label}, authors",
            marker="o" if len(theirs) == 1 else None,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def authors_run(template: str, panel: Mapping[str, Any]) -> str | None:
    """The authors' run a series' ``template`` names in a panel (``{data}`` from ``data.name``, ``{lr}``
    from ``optim.lr``); ``None`` where the authors have no such run (another dataset)."""
    data, lr = panel.get("data.name"), panel.get("optim.lr")
    if data is None:
        return None
    lr_text = "" if lr is None else re.sub(r"e-0*", "e-", f"{float(lr):.0e}")
    run = template.format(data=str(data).upper(), lr=lr_text)
    return run if run in read_runs() else None


def final_epoch(records: Sequence[Record]) -> int | None:
    """The last epoch of ``records`` (their epoch rows, else their config's ``epochs``), ``None`` if none."""
    last = [
        (r.get("epochs") or [{}])[-1].get("epoch") or lookup(r.get("config", {}), "epochs") for r in records
    ]
    return max((e for e in last if e is not None), default=None)


def make_figure(
    name: str,
    records: Sequence[Record],
    out_dir: Path,
    source: str = "",
    note: str | None = None,
    command: str | None = None,
) -> Path:
    """Draw figure ``name`` (a key of ``FIGURES``) from ``records`` into ``<out_dir>/<name>.png``;
    the title states the runs' budget, seeds and source (and ``note``), the PNG's ``Description`` how
    it was made (:func:`convnn.provenance.made_by` of ``command``, by default ``convnn-tables
    figure=<name> source=<source>``). A ``cost`` figure has a second row of panels with the GFLOPs of
    every point. Records holding one run twice are refused (:func:`convnn.runs.records.check_unique`)."""
    check_unique(records)
    fig = draw_figure(name, records, source, note)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    made = made_by(command or f"convnn-tables figure={name} source={display_source(source)}")
    fig.savefig(path, dpi=120, metadata={"Description": made})
    plt.close(fig)
    return path


def draw_figure(name: str, records: Sequence[Record], source: str = "", note: str | None = None) -> Any:
    """The matplotlib ``Figure`` of :func:`make_figure` (not saved). Loss figures have three rows of
    panels (train loss, test loss, test top-1 per epoch); sweep figures one (best-epoch top-1) and a
    GFLOPs row for ``cost`` figures. Every panel overlays the authors' runs of its series (dashed) up to
    the panel's last epoch of ours."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; figures: {sorted(FIGURES)}")
    spec = FIGURES[name]
    records = [r for r in records if r.get("status") == "finished"]
    panels = _facet_values(records, spec.facets) or [(None,) * len(spec.facets)]
    rows = len(CURVE_ROWS) if spec.kind == "loss" else 2 if spec.cost else 1
    fig, axes = plt.subplots(
        rows, len(panels), figsize=(max(8.0, 5.5 * len(panels)), 4.8 * rows), squeeze=False
    )
    for column, panel in enumerate(panels):
        facet = {f: v for f, v in zip(spec.facets, panel, strict=True) if v is not None}
        subset = select(records, facet)
        epoch = final_epoch(subset)
        if spec.kind == "loss":
            for row, (key, ylabel) in enumerate(CURVE_ROWS):
                _draw_curves(axes[row][column], subset, spec, key, facet, epoch)
                axes[row][column].set_ylabel(ylabel)
        else:
            _draw_sweep(axes[0][column], subset, spec, (("best.test_acc1", "-", ""),))
            _draw_authors_sweep(axes[0][column], subset, spec, facet, epoch)
            axes[0][column].set_ylabel("best test top-1 (%)")
        if spec.cost:
            _draw_sweep(axes[1][column], subset, spec, COST_METRICS)
            axes[1][column].set_ylabel("GFLOPs at batch 1 (fvcore MACs; paper's profiler method)")
        for row_axes in axes:
            row_axes[column].set_title(", ".join(f"{k}={v}" for k, v in facet.items()) or spec.title)
            row_axes[column].set_xlabel(spec.xlabel)
            if row_axes[column].get_legend_handles_labels()[0]:
                row_axes[column].legend(fontsize=7)
            else:
                row_axes[column].text(
                    0.5,
                    0.5,
                    "no finished runs",
                    ha="center",
                    va="center",
                    transform=row_axes[column].transAxes,
                )
    lines = [
        f"{name}: {spec.title}",
        describe(records, source),
        AUTHORS_LINE[spec.kind],
        *([note] if note else []),
    ]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    return fig


AUTHORS_LINE = {
    "loss": "solid: ours; dashed: the authors' run of each series (the paper's full-width recipe, one seed)",
    "sweep": "dashed, open: the authors' runs (the paper's full-width recipe), best top-1 of epochs 1..E",
}


def describe(records: Sequence[Record], source: str) -> str:
    """The figure's provenance line: budget(s), epochs, train subset, seeds, source (as
    :func:`convnn.report.tables.display_source` names it)."""
    budgets = sorted(
        {
            f"budget={r.get('budget')} ({lookup(r['config'], 'epochs')} epochs, "
            f"train subset {lookup(r['config'], 'data.subset.train') or 'all'})"
            for r in records
        }
    )
    seeds = sorted({r.get("seed") for r in records}, key=str)
    return (
        f"{'; '.join(budgets) or 'no runs'}\nseeds {seeds}; {len(records)} runs from {display_source(source)}"
    )

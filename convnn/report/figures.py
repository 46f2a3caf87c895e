"""The paper's figures from run records, as PNG (matplotlib): loss curves (Figures 3, 6, 10) and
k / r sweeps (Figures 4, 5, 7, 8). Records are picked by their resolved config (dotted paths), so a
figure reads the directory of its own sweep (``runs/paper/fig4``; Figures 3 and 6 read Table 1's and
Table 2's). Sweep figures plot the best-epoch test top-1 (as the paper's figures do), mean ± std
over seeds; loss curves the per-epoch mean over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from convnn.runs.identity import select as lookup  # noqa: E402 - config["a"]["b"] for "a.b", None if missing

Record = dict[str, Any]
SMOOTH_WINDOW = 10  # the paper's moving average for loss curves


@dataclass(frozen=True)
class Series:
    """Records whose config matches ``match`` (dotted path -> value). ``x``: the swept path (``None``:
    a horizontal baseline); ``square``: plot ``x**2`` (a kernel size as a neighbour count); ``root``:
    plot ``sqrt(x)`` (a candidate count r^2 as the paper's r)."""

    label: str
    match: Mapping[str, Any]
    x: str | None = None
    square: bool = False
    root: bool = False

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


VGG_ROWS = (
    Series("Conv2D", {"layer.ratio": 0.0, "layer.select_by": "features"}),
    Series("Branching (λ=0.5)", {"layer.ratio": 0.5, "layer.select_by": "features"}),
    Series("ConvNN", {"layer.ratio": 1.0, "layer.select_by": "features"}),
)
FIGURES: dict[str, Figure] = {
    "fig3": Figure("loss", "VGG-11 train (dashed) / test (solid) loss", VGG_ROWS),
    "fig4": Figure(
        "sweep",
        "VGG-11: number of neighbours k",
        (
            *(
                Series(
                    f"Branching (λ=0.5), conv kernel {size}",
                    {"layer.ratio": 0.5, "layer.kernel_size": size},
                    x="layer.k",
                )
                for size in (1, 2, 3)
            ),
            Series("Conv2D, kernel size²", {"layer.ratio": 0.0}, x="layer.kernel_size", square=True),
        ),
        xlabel="k (neighbours)",
    ),
    "fig5": Figure(
        "sweep",
        "VGG-11: candidates r (r² random / r x r spatial grid)",
        tuple(
            Series(label, {"layer.ratio": ratio, "layer.sampling": sampling}, **sweep)
            for ratio, name in ((0.5, "Branching (λ=0.5)"), (1.0, "ConvNN"))
            for label, sampling, sweep in (
                (f"{name}, random", "random", {"x": "layer.num_candidates", "root": True}),
                (f"{name}, spatial", "spatial", {"x": "layer.num_candidates", "root": True}),
                (f"{name}, all candidates", "all", {}),
            )
        )
        + (Series("Conv2D", {"layer.ratio": 0.0}),),
        xlabel="r",
        cost=True,
    ),
    "fig6": Figure(
        "loss",
        "ViT-Tiny train (dashed) / test (solid) loss",
        (
            Series("Attention", {"layer.name": "attention"}),
            Series("ConvNN (random, r=32)", {"layer.name": "convnn_attention", "layer.sampling": "random"}),
        ),
    ),
    "fig7": Figure(
        "sweep",
        "ViT-Tiny: number of neighbours k",
        (
            Series("ConvNN (all)", {"layer.name": "convnn_attention", "layer.sampling": "all"}, x="layer.k"),
            Series(
                "ConvNN (random)", {"layer.name": "convnn_attention", "layer.sampling": "random"}, x="layer.k"
            ),
            Series("KVT", {"layer.name": "kvt_attention"}, x="layer.k"),
            Series("Attention", {"layer.name": "attention"}),
        ),
        xlabel="k (neighbours)",
    ),
    "fig8": Figure(
        "sweep",
        "ViT-Tiny ConvNN-attention: candidates r",
        (
            Series(
                "Random",
                {"layer.name": "convnn_attention", "layer.sampling": "random"},
                x="layer.num_candidates",
            ),
            Series(
                "Spatial",
                {"layer.name": "convnn_attention", "layer.sampling": "spatial"},
                x="layer.num_candidates",
            ),
            Series("All candidates", {"layer.name": "convnn_attention", "layer.sampling": "all"}),
            Series("Attention", {"layer.name": "attention"}),
        ),
        xlabel="r (candidates)",
        cost=True,
    ),
    "fig10": Figure(
        "loss",
        "VGG-11 learning rates: train (dashed) / test (solid) loss",
        tuple(Series(s.label, {"layer.ratio": s.match["layer.ratio"]}) for s in VGG_ROWS),
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


def _draw_loss(ax: Any, records: Sequence[Record], spec: Figure) -> None:
    """Train (dashed) and test (solid) loss curves of every series, smoothed as the paper's."""
    for i, series in enumerate(spec.series):
        chosen = select(records, series.match)
        for key, style in (("train_loss", "--"), ("test_loss", "-")):
            epochs, values = mean_curve(chosen, key)
            if not epochs:  # no runs of this series: no line, no legend entry
                continue
            ax.plot(
                epochs,
                smooth(values),
                style,
                color=f"C{i}",
                label=series.label if key == "test_loss" else None,
                marker="o" if len(epochs) == 1 else None,  # a single epoch is a point, not a line
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def make_figure(
    name: str, records: Sequence[Record], out_dir: Path, source: str = "", note: str | None = None
) -> Path:
    """Draw figure ``name`` (a key of ``FIGURES``) from ``records`` into ``<out_dir>/<name>.png``;
    the title states the runs' budget, seeds and source (and ``note``). A ``cost`` figure has a second
    row of panels with the GFLOPs of every point."""
    fig = draw_figure(name, records, source, note)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_figure(name: str, records: Sequence[Record], source: str = "", note: str | None = None) -> Any:
    """The matplotlib ``Figure`` of :func:`make_figure` (not saved)."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; figures: {sorted(FIGURES)}")
    spec = FIGURES[name]
    records = [r for r in records if r.get("status") == "finished"]
    panels = _facet_values(records, spec.facets) or [(None,) * len(spec.facets)]
    rows = 2 if spec.cost else 1
    fig, axes = plt.subplots(
        rows, len(panels), figsize=(max(8.0, 5.5 * len(panels)), 4.8 * rows), squeeze=False
    )
    for column, panel in enumerate(panels):
        facet = {f: v for f, v in zip(spec.facets, panel, strict=True) if v is not None}
        subset = select(records, facet)
        ax = axes[0][column]
        if spec.kind == "loss":
            _draw_loss(ax, subset, spec)
        else:
            _draw_sweep(ax, subset, spec, (("best.test_acc1", "-", ""),))
        ax.set_ylabel("loss" if spec.kind == "loss" else "best test top-1 (%)")
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
    lines = [f"{name}: {spec.title}", describe(records, source), *([note] if note else [])]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    return fig


def describe(records: Sequence[Record], source: str) -> str:
    """The figure's provenance line: budget(s), epochs, train subset, seeds, source."""
    budgets = sorted(
        {
            f"budget={r.get('budget')} ({lookup(r['config'], 'epochs')} epochs, "
            f"train subset {lookup(r['config'], 'data.subset.train') or 'all'})"
            for r in records
        }
    )
    seeds = sorted({r.get("seed") for r in records}, key=str)
    return f"{'; '.join(budgets) or 'no runs'}\nseeds {seeds}; {len(records)} runs from {source}"

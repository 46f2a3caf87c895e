"""The paper's qualitative claims from Tables 1 and 2, judged on runs (``convnn-tables claims=mini``).

A :class:`Claim` compares two paper rows (``results/paper/<table>.csv`` ids) on the final test top-1
(or test loss). Both sides come from :func:`convnn.report.tables.build_table` lines (mean ± sample std over
seeds); nothing is typed in. With ``d`` the difference in the claim's direction minus its margin and
``s = sqrt(std_a² + std_b²)`` the spread of a one-seed difference, the verdict is *supported* when
``d > s``, *contradicted* when ``d < -s`` and *inconclusive* in between (or with fewer than 2 seeds on
a side). A "matches or beats" claim is *supported* within the spread too: matching is what it says.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnn.report.figures import make_figure
from convnn.report.tables import OUT_DIR, build_table, load_records, make_table, match_records, read_paper

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` (paper row ids) on ``metric`` by more than ``margin`` points;
    ``ties`` (a "matches or beats" claim) also counts a difference within the spread as support."""

    text: str
    better: str
    worse: str
    metric: str = "test_acc1"  # test_acc1 (higher is better) | test_loss (lower is better)
    margin: float = 0.0
    ties: bool = False


@dataclass(frozen=True)
class Reproduction:
    """A reduced reproduction: the dataset and paper rows each table keeps, the figures, the claims
    judged and what the setting cannot test, and the budget it ran at."""

    name: str
    budget: str
    dataset: str
    tables: Mapping[str, tuple[str, ...]]
    figures: tuple[str, ...]
    claims: tuple[Claim, ...]
    untestable: tuple[str, ...]


T1 = "t1.c10.features."
T2 = "t2.c10."
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim("Branching λ = 0.25 matches or beats Conv2D (Table 1)", f"{T1}r0.250", f"{T1}conv2d", ties=True),
    Claim("Branching λ = 0.5 matches or beats Conv2D (Table 1)", f"{T1}r0.500", f"{T1}conv2d", ties=True),
    Claim(
        "ConvNN alone (λ = 1) is far (> 10 points) below Conv2D", f"{T1}conv2d", f"{T1}convnn", margin=10.0
    ),
    Claim("Branching λ = 0.25 beats ConvNN alone (the hybrid beats both ends)", f"{T1}r0.250", f"{T1}convnn"),
    Claim("Branching λ = 0.5 beats ConvNN alone", f"{T1}r0.500", f"{T1}convnn"),
    Claim("Branching λ = 0.75 beats ConvNN alone", f"{T1}r0.750", f"{T1}convnn"),
    Claim("Branching λ = 0.5 beats λ = 0.75 (accuracy falls as λ nears 1)", f"{T1}r0.500", f"{T1}r0.750"),
    Claim(
        "Sampled ConvNN-attention (random, r = 32) beats attention (Table 2)",
        f"{T2}convnn_random",
        f"{T2}attention",
    ),
    Claim(
        "Random ConvNN-attention has a lower test loss than attention",
        f"{T2}convnn_random",
        f"{T2}attention",
        "test_loss",
    ),
    Claim("Random ConvNN-attention beats local attention", f"{T2}convnn_random", f"{T2}local"),
    Claim("Random ConvNN-attention beats KVT k = 9", f"{T2}convnn_random", f"{T2}kvt9"),
    Claim(
        "Random candidates beat all candidates (ConvNN-attention)", f"{T2}convnn_random", f"{T2}convnn_all"
    ),
    Claim("Random candidates beat spatial candidates", f"{T2}convnn_random", f"{T2}convnn_spatial"),
    Claim("KVT k = 9 trails attention", f"{T2}attention", f"{T2}kvt9"),
    Claim("Local attention trails attention", f"{T2}attention", f"{T2}local"),
    Claim("ConvNN-attention with all candidates trails attention", f"{T2}attention", f"{T2}convnn_all"),
    Claim("ConvNN-attention with all candidates trails KVT k = 9", f"{T2}kvt9", f"{T2}convnn_all"),
    Claim("Spatial ConvNN-attention is below attention", f"{T2}attention", f"{T2}convnn_spatial"),
)

MINI = Reproduction(
    name="mini",
    budget="mini",
    dataset="cifar10",
    tables={
        "table1": tuple(f"{T1}{r}" for r in ("conv2d", "r0.250", "r0.500", "r0.750", "convnn")),
        "table2": tuple(
            f"{T2}{r}"
            for r in ("attention", "local", "kvt9", "convnn_all", "convnn_random", "convnn_spatial")
        ),
    },
    figures=("fig3", "fig6"),
    claims=PAPER_CLAIMS,
    untestable=(
        "CIFAR-100 (half of both tables) and positional encoding in similarity (Table 1's second block).",
        "The paper's regime: 150 epochs at lr 1e-4 without a schedule on all 50,000 images; late-epoch "
        "effects (Conv2D overfitting after epoch ~40, Figure 3) do not appear in a few epochs.",
        "Full width: VGG-11 at 0.25 width with a 256-wide classifier and a 6-block, 128-wide ViT hold far "
        "fewer parameters, and the mini VGG trains without classifier dropout (the paper: 0.5); the "
        "regularising effect the paper credits ConvNN with may need the large, long-trained model.",
        "ViT token counts: at 32x32 with patch 4 a ViT has 64 + 1 tokens, not 196 + 1 at 224x224 with "
        "patch 16, so r = 32 random candidates are half the tokens (the paper: 16%), and local attention's "
        "128-token window covers the whole sequence (it differs from attention only by rotary positions "
        "and its 64-wide head).",
        "KVT k = 100 and sparse attention (rows left out of the mini sweep to fit its time).",
    ),
)
REPRODUCTIONS = {MINI.name: MINI}


def spread(std_a: float | None, std_b: float | None) -> float | None:
    """The sample std of a one-seed difference, ``sqrt(std_a² + std_b²)`` (``None`` without both)."""
    return None if std_a is None or std_b is None else math.hypot(std_a, std_b)


def judge(claim: Claim, lines: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The claim's numbers (ours and the paper's, for both rows) and its verdict from table ``lines``
    (``build_table`` output keyed by row id)."""
    a, b = lines[claim.better], lines[claim.worse]
    sign = -1.0 if claim.metric == "test_loss" else 1.0
    mean_a, mean_b = a[f"{claim.metric}_mean"], b[f"{claim.metric}_mean"]
    paper_a, paper_b = a[f"paper_{claim.metric}"], b[f"paper_{claim.metric}"]
    s = spread(a[f"{claim.metric}_std"], b[f"{claim.metric}_std"])
    diff = None if mean_a is None or mean_b is None else sign * (mean_a - mean_b)
    if diff is None or s is None:
        verdict, why = INCONCLUSIVE, "fewer than 2 finished seeds on a side"
    elif diff - claim.margin > s:
        verdict, why = SUPPORTED, "difference beyond the spread"
    elif diff - claim.margin < -s:
        verdict, why = CONTRADICTED, "opposite difference beyond the spread"
    elif claim.ties:
        verdict, why = SUPPORTED, "matches within the spread"
    else:
        verdict, why = INCONCLUSIVE, "difference within the spread"
    paper_diff = None if paper_a is None or paper_b is None else sign * (paper_a - paper_b)
    return {
        "claim": claim.text,
        "better": claim.better,
        "worse": claim.worse,
        "metric": claim.metric,
        "margin": claim.margin,
        "ours_better": mean_a,
        "ours_worse": mean_b,
        "n": (a["n"], b["n"]),
        "diff": diff,
        "spread": s,
        "paper_better": paper_a,
        "paper_worse": paper_b,
        "paper_diff": paper_diff,
        "verdict": verdict,
        "why": why,
    }


def table_lines(reproduction: Reproduction, records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``build_table`` lines of every row the reproduction keeps, keyed by row id."""
    out: dict[str, dict[str, Any]] = {}
    for table, ids in reproduction.tables.items():
        rows = [r for r in read_paper(table) if r["row"] in ids]
        matched, _ = match_records(rows, records)
        out.update({line["row"]: line for line in build_table(rows, matched)})
    return out


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "missing"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render_claims(
    reproduction: Reproduction, judged: Sequence[Mapping[str, Any]], header: Sequence[str]
) -> str:
    """``claims.md``: the rule, one table row per claim (ours beside the paper's), what cannot be tested."""
    counts = {v: sum(j["verdict"] == v for j in judged) for v in (SUPPORTED, CONTRADICTED, INCONCLUSIVE)}
    lines = [
        f"# The paper's claims from Tables 1 and 2 at budget={reproduction.budget}",
        "",
        *header,
        "",
        "Each claim compares two rows' final test top-1 % (or test loss, lower is better), mean over seeds. "
        "Δ = the difference in the claim's direction (positive: as the paper says); spread = "
        "sqrt(std₁² + std₂²), the sample std of a one-seed difference. Verdict: supported when Δ − margin "
        "> spread, contradicted when Δ − margin < −spread, otherwise inconclusive; a 'matches or beats' "
        "claim is supported within the spread. Fewer than 2 finished seeds on a side: inconclusive.",
        "",
        f"Verdicts: {counts[SUPPORTED]} supported, {counts[CONTRADICTED]} contradicted, "
        f"{counts[INCONCLUSIVE]} inconclusive (of {len(judged)}).",
        "",
        "| Claim | Metric | Ours (n) | Δ ours | Spread | Paper | Δ paper | Verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for j in judged:
        digits = 3 if j["metric"] == "test_loss" else 2
        ours = (
            f"{_num(j['ours_better'], digits)} vs {_num(j['ours_worse'], digits)} ({j['n'][0]}, {j['n'][1]})"
        )
        paper = f"{_num(j['paper_better'], digits)} vs {_num(j['paper_worse'], digits)}"
        margin = f" (margin {j['margin']:g})" if j["margin"] else ""
        lines.append(
            f"| {j['claim']} | {j['metric']} | {ours} | {_num(j['diff'], digits, True)}{margin} | "
            f"{_num(j['spread'], digits)} | {paper} | {_num(j['paper_diff'], digits, True)} | "
            f"**{j['verdict']}** ({j['why']}) |"
        )
    lines += ["", "## What this setting cannot test", "", *(f"- {u}" for u in reproduction.untestable), ""]
    return "\n".join(lines)


def make_claims(name: str, source: str, out_dir: Path | None = None, note: str | None = None) -> list[Path]:
    """Everything reproduction ``name`` writes from the records in ``source`` into ``out_dir``
    (default ``results/reproduced/<name>``): its tables (md/csv/tex), figures and ``claims.md``."""
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown claims={name!r}; allowed: {sorted(REPRODUCTIONS)}")
    rep = REPRODUCTIONS[name]
    out_dir = OUT_DIR / rep.name if out_dir is None else out_dir
    records = [r for r in load_records(source) if r.get("budget") == rep.budget]
    written = []
    for table, ids in rep.tables.items():
        written += make_table(table, source, out_dir, rep.budget, dataset=rep.dataset, note=note, row_ids=ids)
    written += [make_figure(fig, records, out_dir, source, note) for fig in rep.figures]
    lines = table_lines(rep, records)
    judged = [judge(c, lines) for c in rep.claims]
    header = [
        f"Generated by `convnn-tables claims={name} source={source}` from {len(records)} run records "
        f"at budget={rep.budget}; tables and figures of the same runs beside this file.",
        *([f"Note: {note}"] if note else []),
    ]
    path = out_dir / "claims.md"
    write_text_atomic(path, render_claims(rep, judged, header))
    return [*written, path]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

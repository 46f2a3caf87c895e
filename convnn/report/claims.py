"""The paper's qualitative claims from Tables 1 and 2, judged on runs (``convnn-tables claims=mini``).

A :class:`Claim` compares two paper rows (``results/paper/<table>.csv`` ids) on the test top-1 (or
test loss). Both sides come from :func:`convnn.report.tables.build_table` lines (mean ± sample std over
seeds, averaged as the authors' test numbers are: the per-batch mean where the runs recorded it);
nothing is typed in. ``d`` is a difference in the claim's direction minus its margin (positive: as the
paper says).

**The authors' runs.** Each row has its run in the authors' per-epoch logs (``authors_run``,
:mod:`convnn.report.authors`). The claim *holds* at epoch e in their runs when ``d(e) > 0`` (a "matches
or beats" claim: ``d(e) > -n(e)``, with ``n = sqrt(noise_a² + noise_b²)`` their epoch-to-epoch noise).
Every claim gets the first epoch of 5 in a row where it holds and the epoch from which it holds to the
end of their runs.

**Ours at our epoch E** (the runs' final epoch), with ``s = sqrt(std_a² + std_b²)`` the spread of a
one-seed difference, against the authors' runs at the same E:

- *not testable at E epochs* when the claim does not hold in the authors' runs at E; the report then
  says what their runs show at E (the opposite, ``d < -n``; no clear difference; the claim, ``d > n``)
  and whether ours agree with that (ours likewise: ``d < -s``, within ``s``, ``d > s``);
- otherwise *consistent with the authors' runs at epoch E* when ours show the claim too (``d > s``;
  "matches or beats": ``d > -s``), *inconsistent* when ours show the opposite beyond our spread
  (``d < -s``) while theirs show the claim beyond their noise (``d > n``; "matches or beats": ``d > 0``),
  and *inconclusive* otherwise (or with fewer than 2 seeds on a side).

**The paper's final claim**, a separate verdict on ours alone: *supported* when ``d > s``,
*contradicted* when ``d < -s``, *inconclusive* in between or with fewer than 2 seeds on a side; a
"matches or beats" claim is *supported* within the spread too.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnn.provenance import made_by
from convnn.report.authors import curve, local_noise
from convnn.report.figures import make_figure
from convnn.report.tables import (
    OUT_DIR,
    build_table,
    comparable,
    display_source,
    load_records,
    make_table,
    match_records,
    read_paper,
)

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
    recipe: str


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
    recipe="narrower networks (VGG-11 at 0.25 width with a 256-wide classifier, a 6-block 128-wide ViT at "
    "32x32), a train subset and another optimiser schedule, 3 epochs (VGG) / 2 (ViT)",
)
REPRODUCTIONS = {MINI.name: MINI}


def spread(std_a: float | None, std_b: float | None) -> float | None:
    """The sample std of a one-seed difference, ``sqrt(std_a² + std_b²)`` (``None`` without both)."""
    return None if std_a is None or std_b is None else math.hypot(std_a, std_b)


CONSISTENT, INCONSISTENT, NOT_TESTABLE = "consistent", "inconsistent", "not testable"
RUN_LENGTH = 5  # "the first epoch of 5 in a row where the claim holds"


def held_from(holds: Sequence[bool], run_length: int = RUN_LENGTH) -> tuple[int | None, int | None]:
    """``(first, to_end)`` over per-epoch flags (``holds[e - 1]`` for epoch ``e``): the first epoch
    starting ``run_length`` epochs in a row that hold, and the epoch from which every epoch holds to the
    last (``None`` when there is none)."""
    first = next((e + 1 for e in range(len(holds) - run_length + 1) if all(holds[e : e + run_length])), None)
    to_end = None
    for e in range(len(holds), 0, -1):
        if not holds[e - 1]:
            break
        to_end = e
    return first, to_end


def _direction(d: float | None, scale: float | None) -> int | None:
    """+1 / -1 when ``d`` lies beyond ``±scale``, 0 within; ``None`` when either is unknown."""
    if d is None or scale is None:
        return None
    return 1 if d > scale else -1 if d < -scale else 0


SHOWS = {1: "the claim", 0: "no clear difference", -1: "the opposite"}


def authors_curves(claim: Claim, run_a: str, run_b: str) -> tuple[list[float], list[float]]:
    """The authors' ``d(e)`` (the claim's direction, minus its margin) and ``n(e)`` per epoch."""
    a, b = curve(run_a, claim.metric), curve(run_b, claim.metric)
    sign = -1.0 if claim.metric == "test_loss" else 1.0
    epochs = range(1, min(len(a), len(b)) + 1)
    diffs = [sign * (a[e - 1] - b[e - 1]) - claim.margin for e in epochs]
    noises = [math.hypot(local_noise(a, e) or 0.0, local_noise(b, e) or 0.0) for e in epochs]
    return diffs, noises


def judge_matched(
    claim: Claim, a: Mapping[str, Any], b: Mapping[str, Any], diff: float | None, s: float | None
) -> dict[str, Any]:
    """The authors' side of ``claim`` (lines ``a``, ``b``: its two rows) and our ``diff`` ± ``s`` judged
    against it at our epoch E (the module docstring's rules)."""
    run_a, run_b, epoch = a.get("authors_run"), b.get("authors_run"), a.get("epoch")
    out: dict[str, Any] = {"epoch": epoch, "first_run": None, "to_end": None, "authors_diff": None}
    out |= {"authors_noise": None, "authors_shows": None, "ours_agree": None}
    if run_a is None or run_b is None:
        return out | {"matched": INCONCLUSIVE, "matched_why": "a row has no authors' run"}
    diffs, noises = authors_curves(claim, run_a, run_b)
    holds = [d > (-n if claim.ties else 0.0) for d, n in zip(diffs, noises, strict=True)]
    out["first_run"], out["to_end"] = held_from(holds)
    why = None
    if epoch is None or b.get("epoch") is None:
        why = "a row has no finished runs"
    elif epoch != b.get("epoch"):
        why = f"our rows end at different epochs ({epoch}, {b.get('epoch')})"
    elif epoch > len(diffs):
        why = f"epoch {epoch} is past the authors' log"
    if why is not None:
        return out | {"matched": INCONCLUSIVE, "matched_why": why}
    d_auth, n_auth = diffs[epoch - 1], noises[epoch - 1]
    theirs, ours = _direction(d_auth, n_auth), _direction(diff, s)
    out |= {"authors_diff": d_auth + claim.margin, "authors_noise": n_auth, "authors_shows": SHOWS[theirs]}
    if not holds[epoch - 1]:
        agree = None if ours is None or (ours == 0) != (theirs == 0) else ours == theirs
        word = {None: "inconclusive", True: "agree", False: "disagree"}[agree]
        return out | {
            "ours_agree": agree,
            "matched": NOT_TESTABLE,
            "matched_why": f"the authors' runs show {SHOWS[theirs]} at epoch {epoch}; ours {word}",
        }
    firm = d_auth > (0.0 if claim.ties else n_auth)
    if s is None:
        verdict, why = INCONCLUSIVE, "fewer than 2 finished seeds on a side"
    elif diff > (-s if claim.ties else s):
        verdict, why = CONSISTENT, "ours show the claim too"
    elif diff < -s and firm:
        verdict, why = (
            INCONSISTENT,
            "ours show the opposite beyond our spread, theirs the claim beyond their noise",
        )
    else:
        verdict, why = INCONCLUSIVE, "ours within our spread" if diff >= -s else "theirs within their noise"
    return out | {"matched": verdict, "matched_why": why}


def judge(claim: Claim, lines: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The claim's numbers (ours, the authors' at our epoch E and the paper's, for both rows) and its two
    verdicts (at E against the authors' runs; against the paper's final claim) from table ``lines``
    (``build_table`` output keyed by row id)."""
    a, b = lines[claim.better], lines[claim.worse]
    sign = -1.0 if claim.metric == "test_loss" else 1.0
    (mean_a, std_a), (mean_b, std_b) = comparable(a, claim.metric), comparable(b, claim.metric)
    paper_a, paper_b = a[f"paper_{claim.metric}"], b[f"paper_{claim.metric}"]
    s = spread(std_a, std_b)
    diff = None if mean_a is None or mean_b is None else sign * (mean_a - mean_b)
    d = None if diff is None else diff - claim.margin
    if d is None or s is None:
        verdict, why = INCONCLUSIVE, "fewer than 2 finished seeds on a side"
    elif d > s:
        verdict, why = SUPPORTED, "difference beyond the spread"
    elif d < -s:
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
        **judge_matched(claim, a, b, d, s),
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


def _from(epoch: int | None) -> str:
    return "never" if epoch is None else str(epoch)


def _matched_cell(j: Mapping[str, Any]) -> str:
    """The verdict at our epoch E, in words."""
    at = f"epoch {j['epoch']}"
    if j["matched"] == NOT_TESTABLE:
        return f"**not testable at {j['epoch']} epochs**: {j['matched_why']}"
    if j["matched"] == CONSISTENT:
        return f"**consistent with the authors' runs at {at}** ({j['matched_why']})"
    if j["matched"] == INCONSISTENT:
        return f"**inconsistent with the authors' runs at {at}** ({j['matched_why']})"
    return f"**inconclusive** ({j['matched_why']})"


def render_claims(
    reproduction: Reproduction, judged: Sequence[Mapping[str, Any]], header: Sequence[str]
) -> str:
    """``claims.md``: the rules, one table row per claim (ours and the authors' runs at our epoch E,
    when the authors' runs show the claim, the paper's final values), what the setting cannot test."""
    matched = {v: sum(j["matched"] == v for j in judged) for v in (CONSISTENT, INCONSISTENT, INCONCLUSIVE)}
    untestable = [j for j in judged if j["matched"] == NOT_TESTABLE]
    agree = sum(j["ours_agree"] is True for j in untestable)
    final = {v: sum(j["verdict"] == v for j in judged) for v in (SUPPORTED, CONTRADICTED, INCONCLUSIVE)}
    lines = [
        f"# The paper's claims from Tables 1 and 2 at budget={reproduction.budget}, "
        "against the authors' runs at the same epoch",
        "",
        *header,
        "",
        "Each claim compares two rows' test top-1 % (or test loss, lower is better), mean over seeds, "
        "averaged as the authors' test numbers are (the per-batch mean where our runs recorded it). "
        "Δ = the difference in the claim's direction (positive: as the paper says); spread s = "
        "sqrt(std₁² + std₂²), the sample std of a one-seed difference; the authors' noise n = "
        "sqrt(n₁² + n₂²), each run's epoch-to-epoch noise around E (the residual std of a least-squares "
        "quadratic over the 7 epochs around E). The claim holds at an epoch of the authors' runs when "
        "their Δ − margin > 0 ('matches or beats': > −n); 'shown from' gives the first epoch of 5 in a row "
        "where it holds and the epoch from which it holds to the end of their runs (150 epochs).",
        "",
        "Verdict at our epoch E (the runs' final epoch): **not testable at E epochs** when the claim does "
        "not hold in the authors' runs at E (then: what their runs show at E, the opposite (Δ − margin < "
        "−n), no clear difference or the claim (> n), and whether ours agree (ours likewise beyond ±s)); "
        "otherwise **consistent** when ours show the claim too (Δ − margin > s; 'matches or beats': > −s), "
        "**inconsistent** when ours show the opposite beyond our spread (< −s) while theirs show the claim "
        "beyond their noise, **inconclusive** in between or with fewer than 2 seeds on a side.",
        "",
        "The paper's final claim is a separate question (its epoch-150 numbers, full width): supported "
        "when Δ − margin > s, contradicted when < −s, otherwise inconclusive ('matches or beats': supported "
        "within the spread). A claim contradicted there can still be consistent with the authors' own runs "
        "at E.",
        "",
        f"At the matched epoch: {matched[CONSISTENT]} consistent, {matched[INCONSISTENT]} inconsistent, "
        f"{matched[INCONCLUSIVE]} inconclusive, {len(untestable)} not testable (ours agree with what the "
        f"authors' runs show at E in {agree} of them); of {len(judged)}.",
        f"Against the paper's final numbers: {final[SUPPORTED]} supported, "
        f"{final[CONTRADICTED]} contradicted, {final[INCONCLUSIVE]} inconclusive.",
        "",
        "| Claim | Metric | Authors' runs: shown from epoch (5 in a row / to the end) | E "
        "| Authors @E: Δ ± n | Ours @E (n): Δ ± s | At epoch E, against the authors' runs "
        "| Paper (final): Δ | Ours vs the paper's final claim |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for j in judged:
        digits = 3 if j["metric"] == "test_loss" else 2
        margin = f" (margin {j['margin']:g})" if j["margin"] else ""
        ours = (
            f"{_num(j['ours_better'], digits)} vs {_num(j['ours_worse'], digits)} "
            f"({j['n'][0]}, {j['n'][1]}): {_num(j['diff'], digits, True)} ± {_num(j['spread'], digits)}"
            + margin
        )
        authors = f"{_num(j['authors_diff'], digits, True)} ± {_num(j['authors_noise'], digits)}"
        paper = (
            f"{_num(j['paper_better'], digits)} vs {_num(j['paper_worse'], digits)}: "
            f"{_num(j['paper_diff'], digits, True)}"
        )
        lines.append(
            f"| {j['claim']} | {j['metric']} | {_from(j['first_run'])} / {_from(j['to_end'])} | "
            f"{_num(j['epoch'], 0)} | {authors} | {ours} | {_matched_cell(j)} | {paper} | "
            f"{j['verdict']} ({j['why']}) |"
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
    loaded = load_records(source)  # once: an unreadable record is warned about once
    records = [r for r in loaded if r.get("budget") == rep.budget]
    written = []
    for table, ids in rep.tables.items():
        written += make_table(
            table, source, out_dir, rep.budget, dataset=rep.dataset, note=note, row_ids=ids, loaded=loaded
        )
    command = f"convnn-tables claims={name} source={display_source(source)}"
    written += [make_figure(fig, records, out_dir, source, note, command) for fig in rep.figures]
    lines = table_lines(rep, records)
    judged = [judge(c, lines) for c in rep.claims]
    header = [
        made_by(command),
        f"From {len(records)} run records at budget={rep.budget}; tables and figures of the same runs "
        "beside this file.",
        f"The authors' runs (results/paper/authors/, the run of each row named in results/paper/<table>.csv) "
        f"are the paper's recipe at full width (VGG-11 130M parameters, ViT-Tiny at 224x224; 150 epochs on "
        f"all 50,000 images, one seed); ours at budget={rep.budget}: {rep.recipe}. The matched epoch "
        "compares how far each got after the same number of epochs, not the same network.",
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

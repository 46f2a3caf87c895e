"""The GPU check in one command (``make gpu-check``): what only a CUDA GPU can show, in at most 8 minutes.

Parts, each with its own time budget (a part that overruns is stopped and reported; the rest still run):

1. ``tests``: the tests that need CUDA (``pytest -m cuda``: marked ``cuda``, skipped elsewhere);
2. ``bench``: ``scripts/bench_layers.py --device cuda --batch 256`` (the layer tables and whole
   models; ``results/bench/layers-cuda.{json,md}``);
3. ``table1`` / ``table2``: a short ``convnn-train`` run of one Table 1 row (VGG-11, branching
   lambda = 0.5) and one Table 2 row (ViT-Tiny, ConvNN-attention random r = 32) at the paper's batch
   256: 2 epochs of 100 / 50 steps on a fixed CIFAR-10 subset (synthetic images of CIFAR's shape when
   no CIFAR-10 is found). Per run: images/s of its second epoch, the epoch time that projects to (50,000
   images) against the authors' A100 epoch time for that row, and the peak GPU memory (the CUDA
   caching allocator's, read in the training process as it exits). ``results/bench/train-cuda.{json,md}``;
   ``convnn.runs.cost`` then takes these rows' epoch times and memory for the sweep costs.

The summary goes to ``results/bench/gpu-check-cuda.{json,md}``. Before anything runs, a bare machine's
missing pieces are listed one per line (no CUDA, a missing package, no compiler, no data); without CUDA
or a required package it stops there (exit 2).

    python scripts/gpu_check.py             # or: make gpu-check
    python scripts/gpu_check.py --dry-run   # the checks and the plan, nothing run
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's convnn, installed or not
OUT = ROOT / "results" / "bench"
TOTAL_BUDGET_S = 460  # the parts' budgets sum to this; the check's own work fits in the 20 s left of 8 min
STEPS = {"table1": 100, "table2": 50}  # steps per epoch (2 epochs), batch 256
ON_GPU = "trainer=gpu"  # the short trainings insist on the GPU
REQUIRED = {  # import name -> package
    "torch": "torch",
    "torchvision": "torchvision",
    "lightning": "lightning",
    "torchmetrics": "torchmetrics",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "fvcore": "fvcore",
    "submitit": "submitit",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
    "rich": "rich",
}
ROWS = {
    "table1": (
        "Table 1: VGG-11, branching lambda = 0.5 (all candidates, k = 9)",
        ["experiment=paper/table1", "layer.ratio=0.5", "layer.select_by=features"],
    ),
    "table2": (
        "Table 2: ViT-Tiny, ConvNN-attention random r = 32 (k = 9)",
        [
            "experiment=paper/table2",
            "layer=convnn_attention",
            "layer.sampling=random",
            "layer.num_candidates=32",
            "layer.self_logit=1.0",
            "layer.dropout_on=output",
        ],
    ),
}
# Runs convnn-train in this process and, as it exits, writes the CUDA caching allocator's peaks.
TRAIN = """import atexit, json, os, sys
import torch
def peaks():
    if torch.cuda.is_initialized():
        with open(os.environ["CONVNN_GPU_CHECK_MEMORY"], "w") as f:
            json.dump({"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                       "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}, f)
atexit.register(peaks)
sys.argv = ["convnn-train", *sys.argv[1:]]
from convnn.train.app import main
main()
"""


@dataclass
class Part:
    """One part of the check: ``name``, what it shows, its budget (s) and its command."""

    name: str
    what: str
    budget_s: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


def missing_pieces(data_root: Path) -> tuple[list[str], list[str]]:
    """``(fatal, notes)``: one line per missing piece; fatal ones stop the check."""
    fatal, notes = [], []
    problems = {pkg: problem for module, pkg in REQUIRED.items() if (problem := _import_problem(module))}
    fatal += [
        f"missing Python package {pkg} ({why}; pip install {pkg}, or carry its wheel)"
        for pkg, why in problems.items()
    ]
    if "torch" not in problems:
        import torch

        if not torch.cuda.is_available():
            shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            fatal.append(
                f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none "
                f"(CUDA_VISIBLE_DEVICES={shown}); this check needs one GPU"
            )
    if not _importable("pytest"):
        notes.append("no pytest (pip install pytest): the CUDA tests are skipped")
    if not (shutil.which("c++") or shutil.which("g++")):
        notes.append(
            "no C++ compiler (c++ / g++ on PATH): the native CPU kernels and torch.compile cannot build"
        )
    if not _is_cifar10(data_root):
        notes.append(
            f"no CIFAR-10 at {data_root} (set CONVNN_DATA_ROOT): the short trainings use synthetic images "
            "of CIFAR's shape (the same GPU work; no image decoding, no accuracy)"
        )
    if not os.access(OUT if OUT.exists() else OUT.parent, os.W_OK):
        fatal.append(f"{OUT} is not writable: the results cannot be saved")
    return fatal, notes


def _import_problem(module: str) -> str | None:
    """Why ``module`` does not import (one line), or ``None`` when it does."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to import is the machine's missing piece
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None


def _importable(module: str) -> bool:
    return _import_problem(module) is None


def _is_cifar10(root: Path) -> bool:
    """An ImageFolder copy (``train/`` and ``test/``) or the torchvision files under ``root``."""
    return (root / "train").is_dir() and (root / "test").is_dir() or (root / "cifar-10-batches-py").is_dir()


def training_overrides(row: str, out_dir: Path, data_root: Path) -> list[str]:
    """``convnn-train`` overrides of the short run of ``row``: the paper's recipe and batch on a
    subset of ``STEPS[row]`` batches per epoch, 2 epochs, on the GPU, nothing kept."""
    train, test = 256 * STEPS[row], 256 * 4
    data = (
        [f"data.root={data_root}", f"data.subset.train={train}", f"data.subset.test={test}"]
        if _is_cifar10(data_root)
        else ["data=synthetic", f"data.train_size={train}", f"data.test_size={test}", "data.num_workers=2"]
    )
    return [
        *ROWS[row][1],
        *data,
        "epochs=2",
        ON_GPU,
        "trainer.progress_bar=none",
        "logger=none",
        "checkpoint.enabled=false",
        "overwrite=true",
        f"out_dir={out_dir}",
    ]


def plan(work: Path, data_root: Path) -> list[Part]:
    """The parts in order, with their budgets (summing to :data:`TOTAL_BUDGET_S`)."""
    py = sys.executable
    parts = [
        Part(
            "tests", "the tests that need CUDA (pytest -m cuda)", 80, [py, "-m", "pytest", "-q", "-m", "cuda"]
        ),
        Part(
            "bench",
            "layer and whole-model benchmark at batch 256 (results/bench/layers-cuda.*)",
            140,
            [
                py,
                "scripts/bench_layers.py",
                "--device",
                "cuda",
                "--batch",
                "256",
                "--sections",
                "layers,models",
            ],
        ),
    ]
    for row, budget in (("table1", 100), ("table2", 140)):
        memory = work / f"{row}-memory.json"
        parts.append(
            Part(
                row,
                f"{ROWS[row][0]}: 2 epochs x {STEPS[row]} steps at batch 256",
                budget,
                [py, "-c", TRAIN, *training_overrides(row, work / "runs", data_root)],
                {"CONVNN_GPU_CHECK_MEMORY": str(memory)},
            )
        )
    assert sum(p.budget_s for p in parts) == TOTAL_BUDGET_S
    return parts


def run_part(part: Part) -> dict:
    """Run ``part`` within its budget; its status (``passed`` / ``failed`` / ``timed out``), seconds
    and the tail of its output."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **part.env}
    print(f"gpu-check: {part.name}: {part.what} (budget {part.budget_s} s)", flush=True)
    try:
        done = subprocess.run(
            part.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=part.budget_s
        )
        status, output = ("passed" if done.returncode == 0 else "failed"), done.stdout + done.stderr
        if part.name == "tests" and done.returncode == 5:  # pytest: no test collected
            status = "passed"
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.monotonic() - start
    print(f"gpu-check: {part.name}: {status} in {seconds:.0f} s", flush=True)
    return {
        "part": part.name,
        "what": part.what,
        "budget_s": part.budget_s,
        "status": status,
        "seconds": round(seconds, 1),
        "output_tail": output[-4000:],
    }


def training_row(row: str, work: Path, device: str) -> dict | None:
    """The measured row of a short training (``None`` when it left no record): images/s of epoch 2,
    projected epoch time on 50,000 images, the authors' A100 epoch time, the peak memory, its cost key."""
    from convnn.runs.cost import CIFAR_TRAIN_IMAGES, cost_key, reference
    from convnn.runs.records import read_record

    experiment = ROWS[row][1][0].removeprefix("experiment=")
    records = sorted((work / "runs" / experiment).rglob("results.json"))
    if not records:
        return None
    record = read_record(records[0])
    if len(record.get("epochs") or []) < 2:
        return None
    memory_file = work / f"{row}-memory.json"
    memory = json.loads(memory_file.read_text()) if memory_file.is_file() else {}
    last, config = record["epochs"][-1], record["config"]
    if config["data"]["name"] == "synthetic":  # CIFAR's shape stands in for CIFAR-10: the same row
        config = {**config, "data": {**config["data"], "name": "cifar10"}}
    key = cost_key(config)
    found = reference(key) if key else None
    projected = CIFAR_TRAIN_IMAGES / last["images_per_s"]
    return {
        "row": row,
        "what": ROWS[row][0],
        "device": device,
        "steps": 2 * STEPS[row],
        "images_per_s": round(last["images_per_s"], 1),
        "projected_epoch_s": round(projected, 2),
        "authors_epoch_s": round(found[0].epoch_s, 2) if found else None,
        "vs_authors": round(projected / found[0].epoch_s, 3) if found else None,
        "peak_allocated_mib": memory.get("peak_allocated_mib"),
        "peak_reserved_mib": memory.get("peak_reserved_mib"),
        "data": record["config"]["data"]["name"],
        "key": key,
    }


def _write(name: str, report: dict, markdown: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", markdown)):
        tmp = OUT / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(OUT / f"{name}{suffix}")


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def write_results(machine: dict, parts: list[dict], rows: list[dict], notes: list[str]) -> None:
    """``results/bench/gpu-check-cuda.*`` (every part) and ``train-cuda.*`` (the short trainings), each
    with its Made-by line (:func:`convnn.provenance.made_by`, the GPU's name as the machine)."""
    from convnn.provenance import made_by, script_command

    made = made_by(script_command(), machine=machine["device"])
    when = machine["date"]
    head = f"{machine['device']}, torch {machine['torch']} (CUDA {machine['cuda']}), {when}"
    lines = [
        f"# GPU check: {head}",
        "",
        made,
        "",
        *(f"- {n}" for n in notes),
        "",
        "| part | status | s | budget s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {p['what']} | {p['status']} | {p['seconds']:.0f} | {p['budget_s']} |" for p in parts]
    _write(
        "gpu-check-cuda",
        {"made_by": made, **machine, "notes": notes, "parts": parts},
        "\n".join(lines) + "\n",
    )
    table = [
        f"# Short trainings at batch 256: {head}",
        "",
        made,
        "",
        "Images/s of the second epoch; projected epoch = 50,000 images at that rate (the train loop, as "
        "`epoch_time_s`); the authors' epoch time is their A100's median for the same row "
        "(results/paper/authors/epoch_times.csv); peak memory is the CUDA caching allocator's (allocated / "
        "reserved) in the training process.",
        "",
        "| row | data | steps | images/s | projected epoch s | authors' A100 epoch s | ratio "
        "| peak allocated MiB | peak reserved MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        authors = "–" if r["authors_epoch_s"] is None else f"{r['authors_epoch_s']:.1f}"
        ratio = "–" if r["vs_authors"] is None else f"{r['vs_authors']:.2f}x"
        table.append(
            f"| {r['what']} | {r['data']} | {r['steps']} | {r['images_per_s']:,.0f} | "
            f"{r['projected_epoch_s']:.1f} | "
            f"{authors} | {ratio} | {_mib(r['peak_allocated_mib'])} | {_mib(r['peak_reserved_mib'])} |"
        )
    if rows:
        _write("train-cuda", {"made_by": made, **machine, "rows": rows}, "\n".join(table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="check the machine and list the plan; run nothing"
    )
    args = parser.parse_args()
    data_root = Path(os.environ.get("CONVNN_DATA_ROOT", ROOT / "data")) / "cifar10"
    fatal, notes = missing_pieces(data_root)
    for line in fatal + notes:
        print(f"gpu-check: {line}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        parts = plan(work, data_root)
        if args.dry_run:
            for part in parts:
                shown = " ".join(
                    a if a != TRAIN else "<convnn-train, peak memory at exit>" for a in part.command
                )
                print(f"{part.name:7s} {part.budget_s:4d} s  {part.what}\n          {shown}")
            print(
                f"total budget {TOTAL_BUDGET_S} s; "
                f"results in {OUT}/{{gpu-check,layers,train}}-cuda.{{json,md}}"
            )
            return
        if fatal:
            sys.exit(2)
        import torch

        machine = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.now(UTC).date().isoformat(),
        }
        results = [run_part(p) for p in parts if p.name != "tests" or _importable("pytest")]
        rows = [r for row in ROWS if (r := training_row(row, work, machine["device"]))]
        write_results(machine, results, rows, notes)
    for r in rows:
        print(
            f"gpu-check: {r['what']}: {r['images_per_s']:,.0f} images/s, "
            f"epoch {r['projected_epoch_s']:.1f} s "
            f"(authors' A100: {r['authors_epoch_s']} s), peak {_mib(r['peak_reserved_mib'])} MiB reserved"
        )
    failed = [r["part"] for r in results if r["status"] != "passed"]
    print(
        f"gpu-check: results in {OUT}; "
        + (f"not passed: {', '.join(failed)}" if failed else "all parts passed")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

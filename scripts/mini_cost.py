"""Projected compute time of the mini reproduction (``make mini``) on this machine.

For every distinct configuration of ``experiments/mini/*.yaml`` it times, in CPU seconds of one torch
thread (``time.process_time``, so other processes on a shared machine barely change it), a training
step (forward, backward, AdamW) and an evaluation forward at the budget's batch size on random
``[B, 3, 32, 32]`` inputs, then multiplies by the steps the budget runs (epochs x train subset /
batch, epochs x test subset / batch) and by the seeds. Data loading and start-up are not included;
two torch threads on two idle cores finish the same work faster than one. Writes
``results/bench/mini-cost-<device>.{json,md}``.

    python scripts/mini_cost.py            # all mini jobs, 3 timed steps each
    python scripts/mini_cost.py --steps 1 --quick   # print only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from convnn.models import build_from_config
from convnn.paths import CONFIG_DIR, EXPERIMENTS_DIR
from convnn.provenance import cpu_name, made_by, script_command
from convnn.runs.sweep import expand_jobs

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("table1", "table2")


def experiment_configs(table: str) -> tuple[list[list[str]], int]:
    """The distinct configurations of ``experiments/mini/<table>.yaml`` (seed left out) and the seeds."""
    sweeper = OmegaConf.load(EXPERIMENTS_DIR / "mini" / f"{table}.yaml").hydra.sweeper
    seeds = len(str(sweeper.params.seed).split(","))
    rows = expand_jobs(dict(sweeper.rows), [])
    return [[f"experiment=mini/{table}", *job] for job in rows], seeds


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Mean process CPU seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def measure(overrides: list[str], repeats: int) -> dict[str, object]:
    """One configuration's per-step CPU cost and its projected CPU seconds per run at its budget."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = compose(config_name="train", overrides=overrides)
    batch, epochs, subset = composed.batch_size, composed.epochs, composed.data.subset
    torch.manual_seed(0)
    model, shape = build_from_config(composed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, *shape), torch.randint(0, composed.data.num_classes, (batch,))

    def train_step() -> None:
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()

    def eval_step() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    train_s = cpu_seconds(train_step, repeats)
    model.eval()
    eval_s = cpu_seconds(eval_step, repeats)
    steps = epochs * math.ceil(subset["train"] / batch)
    evals = epochs * math.ceil(subset["test"] / batch)
    return {
        "job": " ".join(overrides),
        "params": sum(p.numel() for p in model.parameters()),
        "train_step_cpu_s": round(train_s, 4),
        "eval_batch_cpu_s": round(eval_s, 4),
        "steps": steps,
        "eval_batches": evals,
        "run_cpu_s": round(steps * train_s + evals * eval_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    made = made_by(script_command())
    rows, total = [], 0.0
    for table in TABLES:
        configs, seeds = experiment_configs(table)
        for overrides in configs:
            row = {"table": table, "seeds": seeds, **measure(overrides, args.steps)}
            total += row["run_cpu_s"] * seeds
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = cpu_name()
    summary = {
        "made_by": made,
        "device": device,
        "threads": 1,
        "jobs": sum(r["seeds"] for r in rows),
        "total_cpu_s": total,
    }
    print(json.dumps(summary))
    if args.quick:
        return
    out = ROOT / "results" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mini-cost-cpu.json").write_text(json.dumps({**summary, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Projected compute of `make mini` (budget=mini)",
        "",
        made,
        "",
        "One torch thread, CPU seconds (process time) per step at the budget's batch size on random "
        "inputs; data loading and start-up not included.",
        "",
        "| table | job | params | train step s | eval batch s | steps | run s | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['table']} | `{r['job']}` | {r['params']:,} | {r['train_step_cpu_s']:.3f} | "
            f"{r['eval_batch_cpu_s']:.3f} | {r['steps']} | {r['run_cpu_s']:.0f} | {r['seeds']} |"
            for r in rows
        ),
        "",
        f"Total: {summary['jobs']} jobs, {total / 3600:.2f} h of one-thread compute.",
        "",
    ]
    (out / "mini-cost-cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

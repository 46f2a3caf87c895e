"""Training-step throughput of the paper-scale VGG-11 (Table 1's backbone) against this machine's own
matrix-multiply rate.

For Table 1's configurations ``experiment=paper/table1 layer.ratio=R`` (R = 0: the paper's Conv2D,
0.5: hybrid branching, 1: ConvNN; CIFAR-10 32x32, full width, the classifier included) it times a
training step (forward, cross-entropy, backward, AdamW) on random images at ``--batch`` (default
256, the paper's; a batch that does not fit in memory is halved until one does), at each of
``--threads`` (default 1 and all cores), the configurations interleaved round by round. At each
thread count it also times a ``--gemm`` square fp32 matrix product, the machine's own matmul rate.
A step's nominal work is 3x its forward multiply-adds (fvcore's count, as the run records give it:
forward, input and weight gradients); **efficiency** is that work per second over the GEMM's rate,
the fraction of the machine's matmul throughput the step reaches (ConvNN's selection has no backward,
so its nominal work overstates the step's by its similarity's share). ``convnn-train``'s allocator
setting is applied, as in a training run. Writes ``<out>/models-<device>.{json,md}``.

    python scripts/bench_models.py --threads 1,2      # 5-20 min on 2 idle CPU cores
    python scripts/bench_models.py --batch 64 --repeats 2 --ratios 0,1 --quick   # prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's convnn, installed or not

from benchlib import machine, machine_line, thread_counts, write_report  # noqa: E402  (scripts/, beside this file)
from hydra import compose, initialize_config_dir  # noqa: E402

from convnn.models import build_from_config  # noqa: E402
from convnn.models.accounting import profile_model  # noqa: E402
from convnn.paths import CONFIG_DIR  # noqa: E402
from convnn.provenance import made_by, script_command  # noqa: E402
from convnn.train.allocator import keep_freed_memory  # noqa: E402

#: Table 1's lambda values measured by default, with the paper's names for them.
RATIOS = {0.0: "Conv2D (λ = 0)", 0.5: "branching (λ = 0.5)", 1.0: "ConvNN (λ = 1)"}


def gemm_gmacs(n: int, repeats: int) -> float:
    """The best multiply-add rate (GMAC/s) of an ``n x n`` fp32 matrix product over ``repeats`` runs,
    at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return n**3 / best / 1e9


def _seconds(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


class Config:
    """One Table 1 configuration: its model, optimiser, inputs and per-image forward GMAC."""

    def __init__(self, ratio: float, batch: int) -> None:
        self.ratio, self.name = ratio, RATIOS.get(ratio, f"λ = {ratio}")
        self.overrides = ["experiment=paper/table1", f"layer.ratio={ratio}", "data=cifar10"]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="train", overrides=self.overrides)
        torch.manual_seed(0)
        self.model, shape = build_from_config(composed)
        self.fwd_gmac = profile_model(self.model, (1, *shape))["gflops"]  # fvcore counts multiply-adds
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.shape, self.classes, self.batch = shape, composed.data.num_classes, batch
        self.inputs()

    def inputs(self) -> None:
        """Random images and labels at ``self.batch``."""
        self.x = torch.randn(self.batch, *self.shape)
        self.y = torch.randint(0, self.classes, (self.batch,))

    def step(self) -> None:
        """One training step."""
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()


def fitting_batch(config: Config) -> None:
    """Halve ``config.batch`` until a training step fits in memory (a ``RuntimeError`` naming memory)."""
    while True:
        try:
            config.step()
            return
        except RuntimeError as e:
            if "memory" not in str(e).lower() or config.batch == 1:
                raise
            config.batch //= 2
            config.inputs()
            print(f"{config.name}: out of memory, batch {config.batch}", flush=True)


def measure(configs: list[Config], threads: int, repeats: int, gemm: int) -> dict:
    """Step times of every configuration at ``threads`` (``repeats`` interleaved rounds after a warm-up
    step each, alternating order) and the GEMM rate."""
    torch.set_num_threads(threads)
    rate = gemm_gmacs(gemm, 3)
    for config in configs:
        config.step()
    seconds: dict[float, list[float]] = {c.ratio: [] for c in configs}
    for round_ in range(repeats):
        for config in configs if round_ % 2 == 0 else configs[::-1]:
            seconds[config.ratio].append(_seconds(config.step))
    rows = []
    for config in configs:
        step_s = statistics.median(seconds[config.ratio])
        step_gmacs = 3 * config.fwd_gmac * config.batch / step_s
        rows.append(
            {
                "config": config.name,
                "ratio": config.ratio,
                "overrides": config.overrides,
                "batch": config.batch,
                "fwd_gmac_per_image": config.fwd_gmac,
                "step_s": step_s,
                "all_step_s": seconds[config.ratio],
                "images_per_s": config.batch / step_s,
                "step_gmacs": step_gmacs,
                "efficiency": step_gmacs / rate,
            }
        )
    return {"threads": threads, "gemm_gmacs": rate, "rows": rows}


def markdown(report: dict) -> str:
    """The report as one Markdown table per thread count."""
    m = report["machine"]
    lines = [
        f"# Paper-scale VGG-11 training step: {m['device_name']} ({m['device']})",
        "",
        report["made_by"],
        "",
        f"{machine_line(m)}. `experiment=paper/table1` (CIFAR-10, full width, classifier included), fp32, "
        f"forward + backward + AdamW on random images, median of {report['repeats']} interleaved repeats; "
        f"allocator as `convnn-train` sets it. **GMAC/image** = forward multiply-adds (fvcore); **step "
        "GMAC/s** = 3x that per image times images/s; **efficiency** = step GMAC/s over the machine's "
        f"own fp32 GEMM rate ({report['gemm']} x {report['gemm']} x {report['gemm']}) at the same thread "
        f"count. Load average at the start {tuple(round(v, 2) for v in report['load_average_start'])}, at "
        f"the end {tuple(round(v, 2) for v in report['load_average_end'])} on {m['cpu_cores']} cores.",
    ]
    for run in report["runs"]:
        t = run["threads"]
        lines += [
            "",
            f"## {t} thread{'s' if t != 1 else ''}: GEMM {run['gemm_gmacs']:.1f} GMAC/s",
            "",
            "| configuration | batch | GMAC/image | step s | images/s | step GMAC/s | efficiency |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in run["rows"]:
            lines.append(
                f"| {r['config']} | {r['batch']} | {r['fwd_gmac_per_image']:.3f} | {r['step_s']:.2f} | "
                f"{r['images_per_s']:.1f} | {r['step_gmacs']:.1f} | {100 * r['efficiency']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="images per step (default 256, the paper's)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps per configuration and thread count"
    )
    parser.add_argument("--threads", help="torch thread counts, comma-separated (default: 1 and all cores)")
    parser.add_argument(
        "--ratios", default="0,0.5,1", help="Table 1 lambda values (layer.ratio), comma-separated"
    )
    parser.add_argument("--gemm", type=int, default=4096, help="side of the reference GEMM (default 4096)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    args = parser.parse_args()
    try:
        threads = thread_counts(args.threads)
    except ValueError as e:
        parser.error(str(e))
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--ratios={args.ratios}: comma-separated numbers within [0, 1]")
    bad = [
        f"--{name}={value}"
        for name, value in vars(args).items()
        if name in ("batch", "repeats", "gemm") and value < 1
    ]
    bad += [f"--ratios={args.ratios}"] if not all(0 <= r <= 1 for r in ratios) else []
    if bad:
        parser.error(
            f"{', '.join(bad)}: --batch, --repeats and --gemm must be positive, --ratios within [0, 1]"
        )
    keep_freed_memory()
    device = torch.device("cpu")
    report = {"made_by": made_by(script_command()), "machine": machine(device), "batch": args.batch}
    report.update(repeats=args.repeats, gemm=args.gemm)
    report.update(load_average_start=os.getloadavg(), runs=[])
    configs = [Config(ratio, args.batch) for ratio in ratios]
    for config in configs:
        fitting_batch(config)
    for t in threads:
        report["runs"].append(measure(configs, t, args.repeats, args.gemm))
        report["load_average_end"] = os.getloadavg()
        print(f"{t} threads done", flush=True)
        if not args.quick:
            write_report(
                args.out, f"models-{device.type}", json.dumps(report, indent=2) + "\n", markdown(report)
            )
    print(markdown(report))


if __name__ == "__main__":
    main()

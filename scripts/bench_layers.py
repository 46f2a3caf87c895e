"""Benchmark the ConvNN layers against the paper's Algorithm 1 (tests/reference_algorithm1.py).

Forward + backward time and peak memory at VGG-11's ConvNN shapes (batch 32) and ViT-Tiny's
(197 tokens x 192), for all / random r=32 / spatial candidates, plus a sweep over N showing how the
sampled variants scale. Every configuration of one shape is timed in the same loop, interleaved, so
ratios are measured side by side on a shared machine. Writes ``<out>/layers-<device>.json`` and
``<out>/layers-<device>.md``.

Peak memory is the peak of the bytes held by tensor storages that ATen ops allocate during one
forward + backward (inputs and parameters excluded, gradients included), tracked exactly by a
``TorchDispatchMode`` that follows every new storage until it is freed. It does not see scratch
buffers that kernels allocate and free internally (e.g. oneDNN workspaces, top-k buffers).

    python scripts/bench_layers.py               # full run (~5 min; one torch thread by default)
    python scripts/bench_layers.py --quick       # batch 4, one repeat, prints only: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the Algorithm 1 reference

from convnn.layers import build_layer  # noqa: E402
from convnn.reference_algorithm1 import Algorithm1ConvNN, algorithm1_on_map  # noqa: E402

VGG_SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]
VIT_TOKENS, VIT_WIDTH = 197, 192
SAMPLED = {
    "random": {"sampling": "random", "num_candidates": 32},
    "spatial": {"sampling": "spatial", "num_candidates": 32},
}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if key not in self.live and size:
                    self.live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def step(fn: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> None:
    """One forward + backward from a clean gradient state."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    fn(x).sum().backward()


def peak_mib(fn: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> float:
    """Peak MiB of tensors allocated by one forward + backward (see the module docstring)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with PeakMemory() as tracker:
        fn(x).sum().backward()
    return tracker.peak / 2**20


def measure(cases: dict[str, tuple[Callable, nn.Module]], x: Tensor, repeats: int) -> dict[str, dict]:
    """Median fwd+bwd seconds (interleaved over cases, after one warm-up each) and peak MiB per case."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn, module in cases.values():
        step(fn, module, x)
    for _ in range(repeats):
        for name, (fn, module) in cases.items():
            start = time.perf_counter()
            step(fn, module, x)
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "ms": 1e3 * statistics.median(t),
            "all_ms": [1e3 * s for s in t],
            "peak_mib": peak_mib(fn, m, x),
        }
        for (name, t), (fn, m) in zip(times.items(), cases.values(), strict=True)
    }


def map_cases(channels: int) -> dict[str, tuple[Callable, nn.Module]]:
    """Algorithm 1 and the ConvNN map layer in its configurations, all ``C -> C`` with k = 9."""
    torch.manual_seed(0)
    alg1 = Algorithm1ConvNN(channels, channels, k=9)
    layers = {
        "convnn all (VGG defaults, padding 1)": {},
        "convnn all (padding 0)": {"padding": 0},
        "convnn all (Algorithm 1 semantics)": {
            "projections": "linear",
            "rho": "softmax",
            "self_first": False,
            "padding": 0,
        },
        **{f"convnn {name} r=32": options for name, options in SAMPLED.items()},
    }
    cases = {"Algorithm 1": (lambda x: algorithm1_on_map(alg1, x), alg1)}
    for name, options in layers.items():
        layer = build_layer("convnn", channels, channels, **options)
        cases[name] = (layer, layer)
    return cases


def token_cases() -> dict[str, tuple[Callable, nn.Module]]:
    """Algorithm 1 on tokens, softmax attention and ConvNN-attention (paper ViT defaults) all / r=32."""
    torch.manual_seed(0)
    alg1 = Algorithm1ConvNN(VIT_WIDTH, VIT_WIDTH, k=9)
    cases = {"Algorithm 1": (lambda x: alg1(x.transpose(1, 2)).transpose(1, 2), alg1)}
    attention = build_layer("attention", VIT_WIDTH, VIT_WIDTH)
    cases["attention (SDPA)"] = (attention, attention)
    for name, options in {"all": {"sampling": "all"}, **SAMPLED}.items():
        layer = build_layer("convnn_attention", VIT_WIDTH, VIT_WIDTH, **options)
        cases[f"convnn_attention {name}" + (" r=32" if name in SAMPLED else "")] = (layer, layer)
    return cases


def sweep(sizes: list[int], batch: int, channels: int, repeats: int) -> list[dict]:
    """ConvNN fwd+bwd time over map sizes: all candidates grow as N^2, random/spatial r=32 as N * r."""
    rows = []
    for size in sizes:
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        cases = {}
        for name, options in {"all": {}, **SAMPLED}.items():
            layer = build_layer("convnn", channels, channels, padding=0, **options)
            cases[name] = (layer, layer)
        result = measure(cases, x, repeats)
        n = size * size
        rows += [
            {"n": n, "sampling": name, **r, "us_per_token": 1e3 * r["ms"] / n} for name, r in result.items()
        ]
    return rows


def machine() -> dict:
    """The CPU model, core count, torch version and threads this run used."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown"
    return {
        "device": "cpu",
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def with_ratios(rows: dict[str, dict]) -> list[dict]:
    """Rows with time and peak-memory ratios against the Algorithm 1 row of the same shape."""
    base = rows["Algorithm 1"]
    return [
        {
            "layer": name,
            **r,
            "speedup_vs_alg1": base["ms"] / r["ms"],
            "memory_vs_alg1": r["peak_mib"] / base["peak_mib"],
        }
        for name, r in rows.items()
    ]


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    m = report["machine"]
    lines = [
        f"# Layer benchmark: {m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads)",
        "",
        f"torch {m['torch']}; forward + backward, median of {report['repeats']} interleaved repeats; "
        "peak = bytes of tensor storages live at once during fwd+bwd (TorchDispatchMode tracker, "
        "kernel-internal scratch not included). Ratios are against Algorithm 1 of the same shape, "
        "measured side by side in this run; the machine was shared, so absolute times are noisy. "
        "Default one torch thread: with two, other jobs on the 2 shared cores stalled OpenMP barriers "
        "(a 300 KB torch.cat took ~100 ms).",
        "",
        "| shape | layer | fwd+bwd ms | speed-up vs Alg. 1 | peak MiB | memory vs Alg. 1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape in report["shapes"]:
        for r in shape["rows"]:
            lines.append(
                f"| {shape['shape']} | {r['layer']} | {r['ms']:.1f} | {r['speedup_vs_alg1']:.2f}x | "
                f"{r['peak_mib']:.1f} | {r['memory_vs_alg1']:.2f}x |"
            )
    lines += [
        "",
        f"## Scaling over N ({report['sweep_setting']})",
        "",
        "| N | sampling | fwd+bwd ms | us per token | peak MiB |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in report["sweep"]:
        lines.append(
            f"| {r['n']} | {r['sampling']} | {r['ms']:.1f} | {r['us_per_token']:.2f} | {r['peak_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared 2-core machine two threads stall in OpenMP barriers)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument(
        "--quick", action="store_true", help="batch 4, one repeat, small sweep; writes nothing"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, repeats = (4, 1) if args.quick else (args.batch, args.repeats)
    sizes = [8, 16, 24] if args.quick else [16, 32, 48, 64]
    shapes = []
    for channels, size in VGG_SHAPES:
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        shape = f"VGG {channels}ch {size}x{size}, batch {batch}"
        shapes.append({"shape": shape, "rows": with_ratios(measure(map_cases(channels), x, repeats))})
        print(shape, "done", flush=True)
    x = torch.randn(batch, VIT_TOKENS, VIT_WIDTH, requires_grad=True)
    shape = f"ViT-Tiny {VIT_TOKENS}x{VIT_WIDTH}, batch {batch}"
    shapes.append({"shape": shape, "rows": with_ratios(measure(token_cases(), x, repeats))})
    sweep_batch, sweep_channels = 2, 16
    report = {
        "machine": machine(),
        "batch": batch,
        "repeats": repeats,
        "k": 9,
        "shapes": shapes,
        "sweep_setting": f"convnn k=9, padding 0, {sweep_channels} channels, batch {sweep_batch}, maps "
        f"{sizes[0]}x{sizes[0]} to {sizes[-1]}x{sizes[-1]}",
        "sweep": sweep(sizes, sweep_batch, sweep_channels, repeats),
    }
    print(markdown(report))
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "layers-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "layers-cpu.md").write_text(markdown(report))


if __name__ == "__main__":
    main()

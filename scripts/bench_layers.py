"""Benchmark the ConvNN layers against the operators they generalise, Algorithm 1 and the FLOP floor.

Forward + backward at VGG-11's ConvNN shapes and ViT-Tiny's (197 tokens x 192): every map layer
against ``nn.Conv2d(C, C, 3, padding=1)``, every token layer against SDPA ``attention`` (and KVT
against a dense masked-softmax KVT), all against the paper's Algorithm 1 (``convnn/knn/reference.py``)
and against the FLOP floor (the case's multiply-adds over the reference's: the time ratio if both ran
at the same FLOP rate). Every case of a shape is timed in the same loop, interleaved, and the median
is taken, so ratios are measured side by side on a shared machine. Per case also: peak tensor memory
(a ``TorchDispatchMode`` tracker), peak RSS (a fresh subprocess per case, ``VmHWM`` above the RSS
before the step: allocator fragmentation included), kernel launches per step (``torch.profiler``: leaf
ATen ops on CPU, kernels on CUDA); then ``torch.compile(fullgraph=True, dynamic=True)`` against eager
and whole-model throughput (VGG-11 features fwd+bwd, ViT-Tiny training step, images/s). On CPU every
timing is taken at each of ``--threads`` (default 1 and all cores), all thread counts of a case in
the same interleaved loop, so the ratios at 1 and N threads are measured side by side; memory and
launches are counted at 1 thread, peak RSS at the most threads. On CUDA it times with CUDA events
at the paper's batch 256. The outputs name the CPU model, its instruction set (torch's CPU
capability: AVX512, AVX2) and the date. The process sets glibc's allocator as ``convnn-train`` does
(:func:`convnn.train.allocator.keep_freed_memory`; ``malloc_tuned`` in the JSON), so the layers are
timed with the allocator they train with. Writes ``<out>/layers-<device>.{json,md}``.

    python scripts/bench_layers.py --threads 1,2   # full run (about 6 min on 2 idle CPU cores)
    python scripts/bench_layers.py --quick         # batch 2, one repeat, small shapes, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's convnn, installed or not

from benchlib import machine, machine_line, thread_counts, write_report  # noqa: E402  (scripts/, beside this file)

from convnn.knn.reference import Algorithm1ConvNN, algorithm1_on_map  # noqa: E402
from convnn.layers import build_layer  # noqa: E402
from convnn.models import build_model  # noqa: E402
from convnn.models.accounting import _native_stderr_silenced  # noqa: E402
from convnn.provenance import cpu_name, made_by, script_command  # noqa: E402
from convnn.train.allocator import keep_freed_memory  # noqa: E402

K, R = 9, 32
VGG_SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]
VIT_TOKENS, VIT_WIDTH = 197, 192
MAP_CASES = {
    "nn.Conv2d 3x3": None,
    "Algorithm 1": None,
    "convnn all (VGG defaults, padding 1)": {},
    "convnn all (padding 0)": {"padding": 0},
    "convnn random r=32": {"sampling": "random", "num_candidates": R, "fallback_to_all": True},
    "convnn spatial r=32": {"sampling": "spatial", "num_candidates": R, "fallback_to_all": True},
}
TOKEN_CASES = {
    "attention (SDPA)": None,
    "dense masked-softmax KVT k=9": None,
    "Algorithm 1": None,
    "convnn_attention all": {"sampling": "all"},
    "convnn_attention random r=32": {"sampling": "random", "num_candidates": R},
    "convnn_attention spatial r=32": {"sampling": "spatial", "num_candidates": R},
    "kvt_attention k=9": None,
}
SECTIONS = ("layers", "compile", "models")  # --sections: the layer tables, torch.compile, whole models
COMPILE_CASES = [("vgg", "convnn all (VGG defaults, padding 1)"), ("vgg", "convnn random r=32")]
COMPILE_CASES += [("vit", "convnn_attention random r=32"), ("vit", "kvt_attention k=9")]


class DenseKVT(nn.Module):
    """KVT as a dense masked softmax: ``[B, N, D] -> [B, N, D]``, scores below each query's k-th best
    masked before the softmax (attention dropout on the weights), the baseline ``kvt_attention`` must beat."""

    def __init__(self, dim: int, k: int = K, dropout: float = 0.1) -> None:
        super().__init__()
        self.k, self.dropout = k, dropout
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        q, key, v = self.w_q(x), self.w_k(x), self.w_v(x)
        scores = q @ key.transpose(1, 2) / math.sqrt(q.shape[-1])
        kth = scores.detach().topk(self.k, dim=-1).values[..., -1:]
        weights = scores.masked_fill(scores < kth, float("-inf")).softmax(-1)
        return self.w_o(F.dropout(weights, self.dropout, self.training) @ v)


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


def build_case(group: str, name: str, batch: int, device: torch.device) -> tuple[Callable, nn.Module, Tensor]:
    """``(fn, module, x)`` of case ``name`` in shape group ``group`` ("vgg<C>x<S>" or "vit")."""
    torch.manual_seed(0)
    if group == "vit":
        x = torch.randn(batch, VIT_TOKENS, VIT_WIDTH, device=device, requires_grad=True)
        if name == "Algorithm 1":
            alg1 = Algorithm1ConvNN(VIT_WIDTH, VIT_WIDTH, k=K).to(device)
            return (lambda t: alg1(t.transpose(1, 2)).transpose(1, 2)), alg1, x
        if name == "attention (SDPA)":
            layer = build_layer("attention", VIT_WIDTH, VIT_WIDTH)
        elif name.startswith("dense masked"):
            layer = DenseKVT(VIT_WIDTH)
        elif name.startswith("kvt_attention"):
            layer = build_layer("kvt_attention", VIT_WIDTH, VIT_WIDTH, k=K)
        else:
            layer = build_layer("convnn_attention", VIT_WIDTH, VIT_WIDTH, **TOKEN_CASES[name])
        layer = layer.to(device)
        return layer, layer, x
    channels, size = (int(v) for v in group.removeprefix("vgg").split("x"))
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    if name == "Algorithm 1":
        alg1 = Algorithm1ConvNN(channels, channels, k=K).to(device)
        return (lambda t: algorithm1_on_map(alg1, t)), alg1, x
    if name == "nn.Conv2d 3x3":
        layer = nn.Conv2d(channels, channels, 3, padding=1)
    else:
        layer = build_layer("convnn", channels, channels, k=K, **MAP_CASES[name])
    layer = layer.to(device)
    return layer, layer, x


def case_macs(group: str, name: str, batch: int) -> float:
    """Multiply-adds of one forward + backward at the case's minimum: dense products 3x (forward,
    input and weight gradients), selection forward only (no gradient with rho = ones; the selected
    pairs' only with softmax), top-k and softmax free."""
    if group == "vit":
        n, d = VIT_TOKENS, VIT_WIDTH
        projections = 3 * 4 * n * d * d
        if name in ("attention (SDPA)", "dense masked-softmax KVT k=9"):
            return batch * (projections + 6 * n * n * d)  # QK^T and AV, each 3x
        if name == "Algorithm 1":
            return batch * (3 * 3 * n * d * d + 3 * n * n * d + 3 * n * K * d * d)
        keys = n if "all" in name or "kvt" in name else R
        aggregate = 3 * n * K * d  # depthwise / sum aggregation of the k weighted rows
        return batch * (projections + n * keys * d + 2 * n * K * d + aggregate)
    channels, size = (int(v) for v in group.removeprefix("vgg").split("x"))
    conv = 3 * size * size * channels * channels * 9
    if name == "nn.Conv2d 3x3":
        return batch * conv
    if name == "Algorithm 1":
        n = size * size
        return batch * (3 * 3 * n * channels * channels + 3 * n * n * channels + conv)
    padded = size + 2 * (0 if "padding 0" in name else 1)
    fits = padded * padded >= R if "random" in name else math.isqrt(R) <= size  # else all (fallback)
    keys = R if ("random" in name or "spatial" in name) and fits else padded * padded
    return batch * (padded * padded * keys * channels + conv)


def step(fn: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor) -> None:
    """One forward + backward from a clean gradient state."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    fn(x).sum().backward()


def timed(fn: Callable, module: nn.Module, x: Tensor) -> float:
    """Seconds of one :func:`step`: CUDA events on CUDA, else wall time."""
    if x.device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, module, x)
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3
    begin = time.perf_counter()
    step(fn, module, x)
    return time.perf_counter() - begin


def interleaved_ms(
    cases: dict[str, tuple[Callable, nn.Module, Tensor]], repeats: int, threads: list[int]
) -> dict[tuple[int, str], list[float]]:
    """Every case's fwd+bwd milliseconds at every thread count, keyed ``(threads, case)``: ``repeats``
    rounds over all of them after one warm-up each; every other round runs them in reverse order, so
    no case always follows the same one."""
    keys = [(t, name) for t in threads for name in cases]
    for t, name in keys:
        torch.set_num_threads(t)
        step(*cases[name])
    times: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    for round_ in range(repeats):
        for t, name in keys if round_ % 2 == 0 else keys[::-1]:
            torch.set_num_threads(t)
            times[t, name].append(1e3 * timed(*cases[name]))
    return times


def ratio_quartiles(numerators: list[float], denominators: list[float]) -> list[float]:
    """Lower quartile, median and upper quartile of the rounds' ratios ``numerators[i] /
    denominators[i]`` (two times from one round of :func:`interleaved_ms`): each ratio compares two
    times taken seconds apart, so the machine's drift over minutes cancels out of it."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3


def peak_tensor_mib(fn: Callable, module: nn.Module, x: Tensor) -> float:
    """Peak MiB of tensors allocated by one forward + backward (kernel-internal scratch not seen)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with PeakMemory() as tracker:
        fn(x).sum().backward()
    return tracker.peak / 2**20


def launches(fn: Callable, module: nn.Module, x: Tensor) -> int:
    """Kernel launches of one step: CUDA kernels, or on CPU the ATen ops that call no other op and do
    more than make a view or allocate (:data:`METADATA_OPS`)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _native_stderr_silenced(), torch.profiler.profile(activities=activities) as prof:
        step(fn, module, x)
    events = prof.events()
    if x.device.type == "cuda":
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    return sum(
        e.name.startswith("aten::")
        and e.name not in METADATA_OPS
        and not any(c.name.startswith("aten::") for c in e.cpu_children)
        for e in events
    )


#: ATen ops that only make views or allocate (no kernel runs): left out of the CPU launch count.
METADATA_OPS = {
    f"aten::{op}"
    for op in [
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "slice",
        "select",
        "as_strided",
        "transpose",
        "permute",
        "expand",
        "t",
        "unsqueeze",
        "squeeze",
        "alias",
        "detach",
        "lift_fresh",
        "diagonal",
        "unflatten",
        "flatten",
        "split",
        "narrow",
        "empty",
        "empty_strided",
        "empty_like",
        "resize_",
        "resolve_conj",
        "resolve_neg",
        "split_with_sizes",
        "unbind",
        "chunk",
    ]
}


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_rss(group: str, name: str, batch: int, threads: int) -> float | None:
    """Peak RSS MiB of the case in a fresh process (None where /proc is missing, e.g. not Linux)."""
    if not Path("/proc/self/status").exists():
        return None
    args = [
        sys.executable,
        __file__,
        "--rss-case",
        group,
        name,
        "--batch",
        str(batch),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def rss_case(group: str, name: str, batch: int) -> None:
    """Print the peak RSS above the pre-step RSS of two steps of one case (run in a fresh process),
    after one step of the case at batch 1: the libraries and modules its code paths load on first use
    (the native kernels, torch's custom-op machinery, which imports torch._dynamo as Lightning does
    anyway) are code, not the step's memory."""
    step(*build_case(group, name, 1, torch.device("cpu")))
    case = build_case(group, name, batch, torch.device("cpu"))
    before = rss_kib("VmRSS")
    for _ in range(2):
        step(*case)
    print(json.dumps({"peak_rss_mib": (rss_kib("VmHWM") - before) / 1024}))


def measure_group(
    group: str, names: list[str], reference: str, batch: int, repeats: int, threads: list[int], device, rss
) -> dict:
    """Rows of one shape: per thread count the times (median ms, every round's) and the ratios to the
    reference (quartiles of the rounds' ratios) and Algorithm 1 (median); the FLOP floor, memory and
    launches (at 1 thread) and peak RSS (at the most threads)."""
    cases = {name: build_case(group, name, batch, device) for name in names}
    times = interleaved_ms(cases, repeats, threads)
    ms = {key: statistics.median(t) for key, t in times.items()}
    macs = {name: case_macs(group, name, batch) for name in names}
    torch.set_num_threads(1)
    rows = []
    for name, case in cases.items():
        by_threads = {
            str(t): {
                "ms": ms[t, name],
                "all_ms": times[t, name],
                "vs_reference_quartiles": ratio_quartiles(times[t, name], times[t, reference]),
                "vs_alg1": ratio_quartiles(times[t, "Algorithm 1"], times[t, name])[1],
            }
            for t in threads
        }
        rows.append(
            {
                "layer": name,
                "threads": by_threads,
                "flop_floor": macs[name] / macs[reference],
                "gmacs": macs[name] / 1e9,
                "peak_tensor_mib": peak_tensor_mib(*case),
                "peak_rss_mib": rss(group, name),
                "launches": launches(*case),
            }
        )
    return {"group": group, "reference": reference, "batch": batch, "rows": rows}


#: The compile section's repeats per ``--repeats``: its ratios sit near 1.0, where 5 repeats scatter by
#: about as much as the difference they measure.
COMPILE_REPEAT_FACTOR = 5


def compiled_vs_eager(batch: int, repeats: int, threads: list[int], device) -> list[dict]:
    """Train-mode fwd+bwd of ``torch.compile(fullgraph=True, dynamic=True)`` against eager, with
    ``repeats`` interleaved rounds at each thread count."""
    rows = []
    for group, name in COMPILE_CASES:
        group = f"vgg{VGG_SHAPES[0][0]}x{VGG_SHAPES[0][1]}" if group == "vgg" else group
        fn, module, x = build_case(group, name, batch, device)
        compiled = torch.compile(module, fullgraph=True, dynamic=True)
        begin = time.perf_counter()
        step(compiled, module, x)
        compile_s = time.perf_counter() - begin
        cases = {"eager": (fn, module, x), "compiled": (compiled, module, x)}
        times = interleaved_ms(cases, repeats, threads)
        by_threads = {}
        for t in threads:
            by_threads[str(t)] = {
                "eager_ms": statistics.median(times[t, "eager"]),
                "compiled_ms": statistics.median(times[t, "compiled"]),
                "ratio_quartiles": ratio_quartiles(times[t, "compiled"], times[t, "eager"]),
            }
        rows.append({"layer": f"{group} {name}", "compile_s": compile_s, "threads": by_threads})
    return rows


def model_throughput(
    batch_vgg: int, batch_vit: int, repeats: int, threads: list[int], device, quick: bool
) -> list[dict]:
    """Images/s of a VGG-11 features pass (fwd+bwd, CIFAR 32x32) and a ViT-Tiny training step (224) at
    each thread count."""
    setups = [
        ("VGG-11 features fwd+bwd, 32x32", "vgg11", {"name": "conv2d"}, batch_vgg, 32),
        ("VGG-11 features fwd+bwd, 32x32", "vgg11", {"name": "convnn"}, batch_vgg, 32),
        (
            "VGG-11 features fwd+bwd, 32x32",
            "vgg11",
            {"name": "convnn", "sampling": "random", "num_candidates": R, "fallback_to_all": True},
            batch_vgg,
            32,
        ),
        ("ViT-Tiny training step, 224x224", "vit_tiny", {"name": "attention"}, batch_vit, 224),
        ("ViT-Tiny training step, 224x224", "vit_tiny", {"name": "kvt_attention"}, batch_vit, 224),
        (
            "ViT-Tiny training step, 224x224",
            "vit_tiny",
            {"name": "convnn_attention", "sampling": "random", "num_candidates": R},
            batch_vit,
            224,
        ),
    ]
    rows = []
    for what, model_name, layer_cfg, batch, size in setups:
        torch.manual_seed(0)
        model_cfg = {"name": model_name}
        if quick and model_name == "vit_tiny":
            model_cfg.update(depth=1)
        model = build_model(model_cfg, layer_cfg, 10, size).to(device).train()
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, 10, (batch,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(m=model, o=optimizer, x=images, y=labels) -> None:
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()

        def features_step(m=model, x=images) -> None:
            m.features(x.requires_grad_()).sum().backward()

        run = features_step if model_name == "vgg11" else train_step
        by_threads = {}
        for t in threads:
            torch.set_num_threads(t)
            run()
            seconds = []
            for _ in range(repeats):
                begin = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - begin)
            ms = 1e3 * statistics.median(seconds)
            by_threads[str(t)] = {"ms": ms, "images_per_s": batch / ms * 1e3}
        layer = ", ".join(f"{k}={v}" for k, v in layer_cfg.items())
        rows.append({"what": what, "layer": layer, "batch": batch, "threads": by_threads})
    return rows


def timing_cells(c: dict) -> str:
    """One thread count's cells of a layer row: ms, vs ref (median and quartiles), vs Alg. 1."""
    low, mid, high = c["vs_reference_quartiles"]
    return f"{c['ms']:.1f} | {mid:.2f}x ({low:.2f}–{high:.2f}) | {c['vs_alg1']:.2f}x"


def markdown(report: dict) -> str:
    """The report as Markdown tables, one column group per thread count."""
    m, threads = report["machine"], [str(t) for t in report["threads"]]
    per = {t: f"{t} thread{'s' if t != '1' else ''}" for t in threads}
    lines = [
        f"# Layer benchmark: {m['device_name']} ({m['device']})",
        "",
        report["made_by"],
        "",
        f"{machine_line(m)}; forward + backward, fp32, median of {report['repeats']} interleaved repeats at "
        f"{' and '.join(per.values())}. Load average (1/5/15 min) at the start "
        f"{tuple(round(v, 2) for v in report['load_average_start'])}, at the end "
        f"{tuple(round(v, 2) for v in report['load_average_end'])} on {m['cpu_cores']} cores: "
        "a load above about 1 per core means other jobs shared the machine and absolute times are "
        "inflated; the ratios are measured side by side either way. "
        "**vs ref** = the median over the rounds of the time over the reference's (nn.Conv2d 3x3 / SDPA "
        "attention) in the same round at the same thread count, with the lower and upper quartile of "
        "those ratios in brackets (their spread is the machine's scatter); **floor** = multiply-adds "
        "over the reference's (the ratio at equal FLOP rates); **vs Alg. 1** = speed-up over "
        "Algorithm 1 (median of the rounds' ratios); **tensor MiB** = peak of live tensor storages "
        "(dispatch tracker, 1 thread); **RSS MiB** = peak RSS above the pre-step RSS in a fresh process "
        f"at {per[threads[-1]]} (allocator included), after a step at batch 1 (the code loaded on first use "
        "is not counted); **launches** = leaf ATen ops that run a kernel (views and allocations left out; "
        "CPU, 1 thread) or CUDA kernels per step.",
    ]
    timing_head = " | ".join(f"ms @{t} | vs ref @{t} | vs Alg. 1 @{t}" for t in threads)
    for group in report["groups"]:
        lines += [
            "",
            f"## {group['group']}, batch {group['batch']} (reference: {group['reference']})",
            "",
            f"| layer | {timing_head} | floor | GMAC | tensor MiB | RSS MiB | launches |",
            "|---|" + "---:|" * (3 * len(threads) + 5),
        ]
        for r in group["rows"]:
            rss = "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
            timing = " | ".join(timing_cells(r["threads"][t]) for t in threads)
            lines.append(
                f"| {r['layer']} | {timing} | {r['flop_floor']:.2f}x | {r['gmacs']:.2f} | "
                f"{r['peak_tensor_mib']:.1f} | {rss} | {r['launches']} |"
            )
    compile_head = " | ".join(f"eager ms @{t} | compiled / eager @{t} | quartiles @{t}" for t in threads)
    lines += [
        "",
        "## torch.compile (fullgraph, dynamic shapes, train mode) against eager",
        "",
        f"Medians of {COMPILE_REPEAT_FACTOR}x as many interleaved repeats as above. **compiled / eager** is "
        "the median of the rounds' ratios (each round times both back to back, in alternating order), "
        "**quartiles** their lower and upper quartile: a range around 1.00x is parity within the "
        "machine's scatter.",
        "",
        f"| case | {compile_head} | compile s |",
        "|---|" + "---:|" * (3 * len(threads) + 1),
    ]
    for r in report["compile"]:
        cells = []
        for t in threads:
            c = r["threads"][t]
            low, mid, high = c["ratio_quartiles"]
            cells.append(f"{c['eager_ms']:.1f} | {mid:.2f}x | {low:.2f}x–{high:.2f}x")
        lines.append(f"| {r['layer']} | {' | '.join(cells)} | {r['compile_s']:.0f} |")
    model_head = " | ".join(f"ms @{t} | images/s @{t}" for t in threads)
    lines += [
        "",
        "## Whole models",
        "",
        f"| model | layer | batch | {model_head} |",
        "|---|---|---:|" + "---:|" * (2 * len(threads)),
    ]
    for r in report["models"]:
        cells = " | ".join(
            f"{c['ms']:.0f} | {c['images_per_s']:.1f}" for c in (r["threads"][t] for t in threads)
        )
        lines.append(f"| {r['what']} | {r['layer']} | {r['batch']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="layer batch (default: 256 on CUDA, 32 on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        help="torch intra-op thread counts, comma-separated (default: 1 and all cores; CUDA: as set)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument(
        "--quick", action="store_true", help="batch 2, one repeat, small shapes; writes nothing"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {list(SECTIONS)} (default: all); the file keeps the others empty",
    )
    parser.add_argument("--rss-case", nargs=2, metavar=("GROUP", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections={args.sections}: allowed: comma-separated of {list(SECTIONS)}")
    device = torch.device(args.device)
    try:
        threads = thread_counts(args.threads) if device.type == "cpu" else [torch.get_num_threads()]
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(threads[-1])
    malloc_tuned = keep_freed_memory()
    batch = args.batch or (256 if device.type == "cuda" else 32)
    if args.rss_case:
        rss_case(*args.rss_case, batch)
        return
    repeats = args.repeats
    shapes = VGG_SHAPES
    if args.quick:
        batch, repeats, shapes = 2, 1, VGG_SHAPES[-2:]
    on_cpu = device.type == "cpu"
    load = os.getloadavg()

    def rss(group: str, name: str) -> float | None:
        return child_rss(group, name, batch, threads[-1]) if on_cpu else None

    info = machine(device)
    made = made_by(script_command(), machine=info["device_name"] if device.type == "cuda" else cpu_name())
    report = {"made_by": made, "machine": info, "threads": threads, "batch": batch, "repeats": repeats}
    report.update(k=K, malloc_tuned=malloc_tuned, groups=[], compile=[], models=[])
    report.update(load_average_start=load, load_average_end=load)

    def save() -> None:  # after every section, so a late failure keeps what was measured
        report["load_average_end"] = os.getloadavg()
        if not args.quick:
            write_report(
                args.out, f"layers-{device.type}", json.dumps(report, indent=2) + "\n", markdown(report)
            )

    for channels, size in shapes if "layers" in sections else []:
        group = f"vgg{channels}x{size}"
        report["groups"].append(
            measure_group(group, list(MAP_CASES), "nn.Conv2d 3x3", batch, repeats, threads, device, rss)
        )
        save()
        print(group, "done", flush=True)
    if "layers" in sections:
        report["groups"].append(
            measure_group("vit", list(TOKEN_CASES), "attention (SDPA)", batch, repeats, threads, device, rss)
        )
        save()
        print("vit done", flush=True)
    if "compile" in sections:
        report["compile"] = compiled_vs_eager(batch, repeats * COMPILE_REPEAT_FACTOR, threads, device)
        save()
        print("compile done", flush=True)
    if "models" in sections:
        report["models"] = model_throughput(
            batch, 8 if on_cpu else batch, max(2, repeats // 2), threads, device, args.quick
        )
        save()
    print(markdown(report))


if __name__ == "__main__":
    main()

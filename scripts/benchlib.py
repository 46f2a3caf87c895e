"""What the benchmark scripts share: the machine a run measured (CPU model, instruction set, cores,
date), the thread counts to measure, and atomic writes of ``<out>/<name>.{json,md}``."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``lscpu``, else ``/proc/cpuinfo``, else the platform's processor)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cores() -> int:
    """The CPUs this process may run on (its affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(device: torch.device) -> dict:
    """The machine a benchmark ran on: device, CPU model, the instruction set torch's CPU kernels use
    (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, ...), cores, versions and the date."""
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def machine_line(m: dict) -> str:
    """One line naming the machine, its instruction set and the date it was measured on."""
    gpu = f"{m['device_name']}, host " if m["device"] == "cuda" else ""
    cpu = f"{m['cpu_model']} ({m['isa']}, {m['cpu_cores']} cores)"
    return f"{gpu}{cpu}, torch {m['torch']}, measured {m['date']}"


def thread_counts(text: str | None) -> list[int]:
    """``--threads``: comma-separated positive counts (``"1,2"``); None: 1 and all of this process's
    cores. Raises ``ValueError`` naming a bad value."""
    if text is None:
        return sorted({1, cores()})
    counts = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise ValueError(f"--threads must be positive integers separated by commas, got {text!r}")
        counts.append(int(part))
    return list(dict.fromkeys(counts))


def write_report(out: Path, name: str, json_text: str, markdown: str) -> None:
    """``<out>/<name>.json`` and ``.md``, each written atomically (a temp file renamed over it)."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, content in ((".json", json_text), (".md", markdown)):
        tmp = out / f".{name}{suffix}.tmp"
        tmp.write_text(content)
        tmp.replace(out / f"{name}{suffix}")

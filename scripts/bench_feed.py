"""Benchmark the data feed of ViT on CIFAR-10 (32x32 images, model input 224): what the loader's CPU
does per batch and how many bytes cross to the device, with the CPU feed (resize and normalise in
the loader) against the GPU feed (``uint8`` at 32x32; :class:`~convnn.train.data.DeviceTransform`
after the copy), and whether the GPU feed's resize gives the CPU resize's bytes on every image.

Both feeds read the same images in the same order in one process (no workers), interleaved, one
torch thread; the median per batch is kept. The device transform is timed here on the CPU too (on a
GPU it runs there instead). Writes ``<out>/feed-cpu.{json,md}``.

    python scripts/bench_feed.py                  # CIFAR-10 under $CONVNN_DATA_ROOT: 20 batches of 256
    python scripts/bench_feed.py --exact-all      # plus the byte check on all 60,000 images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's convnn, installed or not

from convnn.provenance import made_by, script_command  # noqa: E402
from convnn.train.config import DataConfig  # noqa: E402
from convnn.train.data import DataFeed, ImageDataModule, load_image, resize_like_cpu  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def time_batches(module: ImageDataModule, batches: int) -> tuple[list[float], list[float]]:
    """Seconds per batch of the test loader (decoding; the CPU feed also resizes and normalises), and
    of the batch hook after it (the GPU feed's device transform, timed here on the CPU)."""
    loader_s, hook_s = [], []
    batches_iter = iter(module.val_dataloader())
    for _ in range(batches):
        start = time.perf_counter()
        batch = next(batches_iter)
        loaded = time.perf_counter()
        module.on_after_batch_transfer(batch, 0)
        loader_s.append(loaded - start)
        hook_s.append(time.perf_counter() - loaded)
    return loader_s, hook_s


def exact_check(root: Path, limit: int | None) -> dict[str, int]:
    """Bytes where :func:`resize_like_cpu` differs from torchvision's CPU resize at 224, over every
    image under ``root`` (``limit``: that many, evenly spaced over both splits and every class)."""
    files = sorted(root.glob("*/*/*.*"))
    files = files if limit is None else files[:: max(1, len(files) // limit)][:limit]
    differing = 0
    for start in range(0, len(files), 500):
        images = torch.stack([TF.pil_to_tensor(load_image(str(f))) for f in files[start : start + 500]])
        want = TF.resize(images, [224, 224], antialias=True)
        differing += int((resize_like_cpu(images, 224) != want).sum())
    return {"images": len(files), "bytes": len(files) * 3 * 224 * 224, "differing_bytes": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=Path(os.environ.get("CONVNN_DATA_ROOT", "data")) / "cifar10"
    )
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--exact-all", action="store_true", help="check the resize on every image")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DataConfig(name="cifar10", root=str(args.root), mean=MEAN, std=STD)
    feeds = {name: DataFeed(0, False, False, name) for name in ("cpu", "device")}
    modules = {
        name: ImageDataModule(cfg, 224, args.batch_size, args.batch_size, feed=f) for name, f in feeds.items()
    }
    times = {name: ([], []) for name in modules}
    for module in modules.values():
        module.setup()
    for _ in range(3):  # interleaved rounds
        for name, module in modules.items():
            loader_s, hook_s = time_batches(module, args.batches // 3 + 1)
            times[name][0].extend(loader_s)
            times[name][1].extend(hook_s)
    first = {name: next(iter(module.val_dataloader()))[0] for name, module in modules.items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), 1 torch thread"
    result = {
        "made_by": made_by(script_command()),
        "machine": machine,
        "date": date.today().isoformat(),
        "batch_size": args.batch_size,
        "loader_s_per_batch": {name: statistics.median(t[0]) for name, t in times.items()},
        "device_transform_s_per_batch": statistics.median(times["device"][1]),
        "bytes_per_batch_to_device": {
            name: first[name].numel() * first[name].element_size() for name in first
        },
        "exact": exact_check(args.root, None if args.exact_all else 2000),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feed-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    loader, sent, exact = result["loader_s_per_batch"], result["bytes_per_batch_to_device"], result["exact"]
    transform = result["device_transform_s_per_batch"]
    lines = [
        f"# Data feed, ViT on CIFAR-10 (32 -> 224), batch {args.batch_size}",
        "",
        result["made_by"],
        "",
        f"Measured on {result['machine']}, {result['date']} (`scripts/bench_feed.py`); medians per batch,",
        "the two feeds interleaved in one process.",
        "",
        "| feed | loader CPU per batch (s) | bytes to the device per batch |",
        "|---|---|---|",
        f"| CPU feed (resize + normalise in the loader) | {loader['cpu']:.3f} | {sent['cpu']:,} |",
        f"| GPU feed (uint8 32x32) | {loader['device']:.3f} | {sent['device']:,} |",
        "",
        f"The GPU feed's device transform, timed on this CPU: {transform:.3f} s per"
        f" batch (on a GPU it runs there). Resize check: {exact['differing_bytes']:,} of {exact['bytes']:,}"
        f" bytes differ from torchvision's CPU resize ({exact['images']:,} images, every split and class).",
    ]
    (args.out / "feed-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

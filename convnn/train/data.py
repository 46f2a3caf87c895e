"""Datasets and the ``LightningDataModule`` that feeds training.

Sources: CIFAR-10/100 through torchvision (downloaded into ``data.root`` when a network is there),
any ImageFolder tree (``<root>/<train_split>/<class>/*.jpg``, ``<root>/<test_split>/...``: ImageNet,
or the offline CIFAR-10 copy), and a learnable synthetic dataset for tests. Images become
``[C, S, S]`` float tensors: resized to the model's input size ``S`` where it differs from the
dataset's (ViT: 224), then normalised per channel with the dataset's mean/std (paper Sec. 10).

Where that happens is the :class:`DataFeed`'s choice: in the loader workers (CPU training), or, when
training on a GPU, on the device after the copy (:class:`DeviceTransform`): the loaders then carry
``uint8`` images at the dataset's size (for ViT on CIFAR 196x fewer bytes than 224x224 float32) and
the device resizes and normalises them with the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from convnn.train.config import DataConfig

TORCHVISION_CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


class SyntheticImages(Dataset):
    """Learnable random images: class ``c`` is a smooth random prototype plus Gaussian pixel noise.

    Item ``i`` is ``([C, S, S] float in [0, 1], label)``, a pure function of ``(seed, i)``; labels
    cycle through the classes so every class is equally represented.
    """

    def __init__(
        self, size: int, num_classes: int, image_size: int, channels: int, seed: int, noise: float = 0.3
    ) -> None:
        self.size, self.num_classes, self.seed, self.noise = size, num_classes, seed, noise
        g = torch.Generator().manual_seed(12345)
        coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
        self.prototypes = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn(self.prototypes.shape[1:], generator=g) * self.noise
        return (self.prototypes[label] + noise).clamp(0, 1), label


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(n)`` anew each epoch with a permutation that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees the
    same data order as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def global_batch_sizes(n: int, batch_size: int, world: int = 1, train: bool = False) -> list[int]:
    """Sizes of the global batches an epoch of ``n`` images is cut into: ``batch_size`` each, the
    last one short; in training (``train``) under DDP a short last batch keeps a multiple of
    ``world`` images (every rank needs as many equal steps), or is left out when below ``world``."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return [s - s % world for s in sizes if s >= world] if train else sizes


class RankBatches(Sampler[list[int]]):
    """One rank's share of the global batches: ``[rank's indices]`` per step.

    The indices of ``sampler`` (an epoch's order) are cut into global batches
    (:func:`global_batch_sizes`); each global batch into ``world`` contiguous parts, part ``r`` for
    rank ``r``, so the ranks together see exactly the global batches one process would. Training
    parts are equal (see ``train`` there). Evaluation keeps every image once: parts differ by at
    most one image and a rank without any of the last batch has one step fewer (no padding with
    repeats, unlike ``DistributedSampler``). Rank ``r``'s ``j``-th batch is its part of global batch
    ``j``. With ``world = 1`` these are the batches of ``DataLoader(batch_size=batch_size,
    sampler=sampler)``. ``set_epoch`` goes to ``sampler`` (Lightning calls it on both every epoch).
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, rank: int = 0, world: int = 1, train: bool = False
    ) -> None:
        if not 0 <= rank < world or batch_size % world:
            raise ValueError(f"rank {rank} of {world} cannot split global batches of {batch_size}")
        self.sampler, self.rank, self.world = sampler, rank, world
        self.sizes = global_batch_sizes(len(sampler), batch_size, world, train)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _part(self, size: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's part of a global batch of ``size``."""
        small, extra = divmod(size, self.world)
        start = self.rank * small + min(self.rank, extra)
        return start, start + small + (self.rank < extra)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        offset = 0
        for size in self.sizes:
            start, stop = self._part(size)
            if stop > start:
                yield order[offset + start : offset + stop]
            offset += size

    def __len__(self) -> int:
        return sum(1 for size in self.sizes if self._part(size)[1] > self._part(size)[0])


def build_transform(cfg: DataConfig, image_size: int, train: bool, on_device: bool = False) -> v2.Compose:
    """PIL image or ``[C, H, W]`` tensor -> normalised float ``[C, S, S]`` with ``S = image_size``.

    Resizing (shorter side to ``S``, then a centre crop) happens only when ``S`` differs from the
    dataset's native ``data.image_size`` or the images may vary in size (ImageFolder).
    ``data.augment=crop_flip`` adds a random crop (padding 1/8 of the side) and horizontal flip to
    the training transform, before resizing. ``on_device``: the steps up to the image at the
    dataset's size ``data.image_size`` (``uint8`` for decoded files), leaving the resize to ``S``,
    the scaling and the normalisation to :class:`DeviceTransform`.
    """
    steps: list = [v2.ToImage()]
    if train and cfg.augment == "crop_flip":
        steps += [
            v2.RandomCrop(cfg.image_size, padding=cfg.image_size // 8),
            v2.RandomHorizontalFlip(),
        ]
    size = cfg.image_size if on_device else image_size
    if size != cfg.image_size or _uses_imagefolder(cfg):
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    if not on_device:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    return v2.Compose(steps)


def resize_like_cpu(images: Tensor, size: int) -> Tensor:
    """``[B, C, h, w] uint8 -> [B, C, size, size] uint8``: torchvision's bilinear antialiased resize of
    ``uint8`` images as its CPU kernel computes it, on any device.

    The CPU kernel resizes the width, rounds to ``uint8``, then the height, rounding half up each
    time; elsewhere torchvision resizes in float in one pass and rounds half to even, which moves 12 %
    of the pixels of CIFAR images upscaled to 224 by one level. Two float passes rounded half up give
    the CPU kernel's bytes exactly for integer scale factors without half-way ties in float (tested:
    32 -> 64, 96, 224 and every CIFAR-10 image at 224); other factors can differ by a level or two.
    """
    height = images.shape[-2]

    def bilinear(x: Tensor, out: tuple[int, int]) -> Tensor:
        x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)
        return x.add_(0.5).floor_().clamp_(0, 255)

    wide = bilinear(images.float(), (height, size))
    return bilinear(wide, (size, size)).to(torch.uint8)


class DeviceTransform:
    """The last steps of :func:`build_transform` run on a batch where it trains: ``[B, C, s, s]`` at
    the dataset's size -> normalised float32 ``[B, C, S, S]``.

    ``uint8`` batches are resized with :func:`resize_like_cpu`, float ones (the synthetic data) with
    torchvision's resize, then scaled and normalised with the ops of ``v2.ToDtype`` / ``v2.Normalize``
    (same values as the CPU transform). No host sync per batch: the mean and std are copied to each
    device once.
    """

    def __init__(self, cfg: DataConfig, image_size: int) -> None:
        self.size, self.mean, self.std = image_size, list(cfg.mean), list(cfg.std)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.size, self.size):
            if images.dtype == torch.uint8:
                images = resize_like_cpu(images, self.size)
            else:
                images = v2.functional.resize(images, [self.size, self.size], antialias=True)
        x = v2.functional.to_dtype(images, torch.float32, scale=True)
        mean, std = self._device_stats(x.device)
        return x.sub(mean).div_(std)

    def _device_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            mean, std = (torch.tensor(v, device=device).view(-1, 1, 1) for v in (self.mean, self.std))
            self._stats[device] = mean, std
        return self._stats[device]


@dataclass(frozen=True)
class DataFeed:
    """How batches reach the model: loader workers, pinned host memory, workers kept across epochs,
    and where images are resized and normalised ("device": :class:`DeviceTransform` after the copy;
    "cpu": in the workers). Recorded as the run record's ``data_feed``."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    transforms: str

    def as_record(self) -> dict[str, Any]:
        """The JSON the run record keeps."""
        return asdict(self)


#: Loader workers per GPU at most, when ``data.num_workers`` is unset.
MAX_GPU_WORKERS = 8
#: Loader workers of a CPU run when ``data.num_workers`` is unset: none, the torch threads take every
#: core and the batches are decoded between steps (workers on the same cores made the quickstart
#: slower: see docs/performance.md).
CPU_WORKERS = 0


def data_feed(cfg: DataConfig, gpu: bool, devices: int = 1) -> DataFeed:
    """The feed of a run on a GPU (``gpu``, ``devices`` per node) or the CPU.

    ``data.num_workers`` / ``data.pin_memory`` when set; unset (null): on a GPU, pinned memory and one
    worker per CPU this process may use, shared by the node's ``devices`` and less one for the
    training process, at most :data:`MAX_GPU_WORKERS`; on the CPU :data:`CPU_WORKERS` workers and no
    pinning. Workers persist across epochs whenever there are any. On a GPU the images are resized
    and normalised on the device.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    auto_workers = min(MAX_GPU_WORKERS, max(1, cpus // max(1, devices) - 1)) if gpu else CPU_WORKERS
    workers = auto_workers if cfg.num_workers is None else cfg.num_workers
    pin = gpu if cfg.pin_memory is None else cfg.pin_memory
    return DataFeed(workers, pin, workers > 0, "device" if gpu else "cpu")


def _uses_imagefolder(cfg: DataConfig) -> bool:
    """Whether ``cfg`` reads an ImageFolder tree: ``data.format``, or for ``auto`` a split folder
    (``train/`` or ``test/``) under ``data.root`` (one alone is a broken copy, reported by
    :func:`_imagefolder` naming the missing folder, never a reason to download torchvision's files)."""
    if cfg.name == "synthetic":
        return False
    if cfg.format != "auto":
        return cfg.format == "imagefolder"
    if cfg.name not in TORCHVISION_CIFAR:
        return True
    root = Path(cfg.root)
    return (root / cfg.train_split).is_dir() or (root / cfg.test_split).is_dir()


class CorruptImageError(OSError):
    """An image file that cannot be decoded; the message names the file."""


def load_image(path: str) -> Image.Image:
    """``path`` as an RGB PIL image; an undecodable file raises ``CorruptImageError`` naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(
            f"corrupt image file {path} ({type(e).__name__}: {e}); remove or replace it"
        ) from None


def _without_images(path: Path) -> list[str]:
    """The class folders under ``path`` (an ImageFolder split) holding no image ImageFolder reads."""
    return [
        str(folder)
        for folder in sorted(p for p in path.iterdir() if p.is_dir())
        if not any(
            f.is_file() and has_file_allowed_extension(f.name, IMG_EXTENSIONS) for f in folder.rglob("*")
        )
    ]


def _imagefolder(cfg: DataConfig, train: bool, transform: v2.Compose) -> datasets.ImageFolder:
    path = Path(cfg.root) / (cfg.train_split if train else cfg.test_split)
    name = "train" if train else "test"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{cfg.name}: the {name} split folder {str(path)!r} is missing; data.root={cfg.root!r} must "
            f"hold {cfg.train_split}/ and {cfg.test_split}/ folders with one sub-folder per class"
        )
    empty = _without_images(path)
    if empty:
        raise FileNotFoundError(
            f"{cfg.name}: {len(empty)} class folder(s) of the {name} split {str(path)!r} hold no image: "
            f"{empty}; add images ({', '.join(IMG_EXTENSIONS)}) or remove the folder(s)"
        )
    ds = datasets.ImageFolder(str(path), transform=transform, loader=load_image)
    if len(ds.classes) != cfg.num_classes:
        raise ValueError(
            f"{cfg.name}: {str(path)!r} has {len(ds.classes)} class folders but data.num_classes="
            f"{cfg.num_classes}"
        )
    return ds


def _torchvision_cifar(cfg: DataConfig, train: bool, transform: v2.Compose | None, download: bool) -> Dataset:
    cls = TORCHVISION_CIFAR[cfg.name]
    try:
        return cls(cfg.root, train=train, download=download, transform=transform)
    except (RuntimeError, OSError) as e:
        raise FileNotFoundError(
            f"{cfg.name} not found under data.root={cfg.root!r} and "
            f"{'could not be downloaded' if download else 'data.download=false'} ({e}). Point data.root "
            f"(or $CONVNN_DATA_ROOT, the parent of <name>/) at the torchvision files or at an ImageFolder "
            f"copy with {cfg.train_split}/<class>/ and {cfg.test_split}/<class>/ folders"
        ) from None


def build_dataset(
    cfg: DataConfig, train: bool, image_size: int, seed: int = 0, on_device: bool = False
) -> Dataset:
    """The full train or test split of ``cfg`` (before ``data.subset``), transformed to ``image_size``
    (``on_device``: up to the dataset's own size, see :func:`build_transform`)."""
    transform = build_transform(cfg, image_size, train, on_device)
    if cfg.name == "synthetic":
        size = cfg.train_size if train else cfg.test_size
        if size is None:
            raise ValueError("synthetic data needs data.train_size and data.test_size")
        base = SyntheticImages(
            size, cfg.num_classes, cfg.image_size, cfg.in_channels, seed + (0 if train else 1)
        )
        return _TransformedTensors(base, transform)
    if _uses_imagefolder(cfg):
        return _imagefolder(cfg, train, transform)
    return _torchvision_cifar(cfg, train, transform, download=False)


class _TransformedTensors(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` item of ``base``."""

    def __init__(self, base: Dataset, transform: v2.Compose) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def fixed_subset(ds: Dataset, n: int | None, seed: int, key: str) -> Dataset:
    """``n`` items of ``ds`` chosen by a seeded permutation (sorted indices); all of it when ``n`` is None."""
    if n is None:
        return ds
    if n > len(ds):
        raise ValueError(f"{key}={n} exceeds the {len(ds)} images of that split")
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:n].tolist()))


class ImageDataModule(L.LightningDataModule):
    """Train / test loaders for one ``DataConfig``; the test split doubles as Lightning's validation set.

    Batches reach the model as ``([B, C, S, S] float, [B] int64)``. ``batch_size`` and
    ``eval_batch_size`` are global: under DDP each rank loads its part of every global batch
    (:class:`RankBatches`; the trainer's ``use_distributed_sampler`` must be off), so the global
    batches are those of one process.
    ``feed`` (default: :func:`data_feed` for the CPU) sets the loaders and where images are resized
    and normalised; with ``feed.transforms == "device"`` the loaders yield the dataset-size images and
    :meth:`on_after_batch_transfer` finishes them on the device (:class:`DeviceTransform`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        image_size: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int = 0,
        feed: DataFeed | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.image_size, self.seed = cfg, image_size, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.feed = feed or data_feed(cfg, gpu=False)
        self.device_transform = DeviceTransform(cfg, image_size) if self.feed.transforms == "device" else None
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._start_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints, which are written at the end of an epoch: the epoch to continue with."""
        return {"next_epoch": self.trainer.current_epoch + 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Lightning creates a resumed run's first iterator before it sets the sampler's epoch; this
        makes the sampler start at the right epoch anyway."""
        self._start_epoch = state["next_epoch"]

    def prepare_data(self) -> None:
        """Download torchvision CIFAR (rank 0) when the files are missing and ``data.download`` is set."""
        if self.cfg.name in TORCHVISION_CIFAR and not _uses_imagefolder(self.cfg):
            for train in (True, False):
                _torchvision_cifar(self.cfg, train, None, download=self.cfg.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sub, on_device = self.cfg.subset, self.device_transform is not None
        train = build_dataset(self.cfg, True, self.image_size, self.seed, on_device)
        test = build_dataset(self.cfg, False, self.image_size, self.seed, on_device)
        self.train_set = fixed_subset(train, sub.train, sub.seed, "data.subset.train")
        self.test_set = fixed_subset(test, sub.test, sub.seed + 1, "data.subset.test")

    def _ranks(self) -> tuple[int, int]:
        """``(rank, world size)`` of the trainer (``(0, 1)`` without one)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, ds: Dataset, batches: RankBatches) -> DataLoader:
        feed = self.feed
        return DataLoader(
            ds,
            batch_sampler=batches,
            num_workers=feed.num_workers,
            pin_memory=feed.pin_memory,
            persistent_workers=feed.persistent_workers,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``(images, labels)`` on the training device: the images finished by :class:`DeviceTransform`
        when the feed resizes and normalises there."""
        if self.device_transform is None:
            return batch
        images, labels = batch
        return self.device_transform(images), labels

    def train_batches(self) -> RankBatches:
        """This rank's training batches, in the order of epoch ``_start_epoch`` until Lightning sets one."""
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        sampler.set_epoch(self._start_epoch)
        return RankBatches(sampler, self.batch_size, *self._ranks(), train=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_batches())

    def val_dataloader(self) -> DataLoader:
        batches = RankBatches(SequentialSampler(self.test_set), self.eval_batch_size, *self._ranks())
        return self._loader(self.test_set, batches)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

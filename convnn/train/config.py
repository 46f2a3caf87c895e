"""Structured (dataclass) schema of the training config and its start-up validation.

``validate_config`` turns a composed Hydra config into a typed ``TrainConfig``; any bad key, type
or value raises ``ConfigError`` whose one-line message names the key, the value and what is
allowed. ``model`` and ``layer`` stay free-form here: their keys are builder arguments, checked by
``check_layer_options`` (types, from the builder's signature) and by the constructors themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

DATASETS = ("cifar10", "cifar100", "imagenet", "synthetic")
DATA_FORMATS = ("auto", "torchvision", "imagefolder")
AUGMENTATIONS = ("none", "crop_flip")
ACCELERATORS = ("cpu", "gpu", "auto")
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("32", "bf16")
PROGRESS_BARS = ("rich", "tqdm", "none")
LOGGERS = ("none", "csv", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything enforces


class ConfigError(ValueError):
    """A bad config value; ``str(error)`` is one line naming the key, the value and what is allowed."""


@dataclass
class SubsetConfig:
    """A fixed, seeded random subset of the train / test split (``None``: the whole split)."""

    train: int | None = None
    test: int | None = None
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str | None = None
    format: str = "auto"
    download: bool = True
    train_split: str = "train"
    test_split: str = "test"
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    train_size: int | None = None
    test_size: int | None = None
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    augment: str = "none"
    num_workers: int | None = None  # null: chosen for the device (convnn.train.data.data_feed)
    pin_memory: bool | None = None  # null: pinned when training on a GPU


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32"
    compile: bool = False
    deterministic: bool | None = None  # null: "warn" on a GPU, off on the CPU (convnn.train.gpu)
    progress_bar: str = "rich"
    sync_batchnorm: bool = True  # DDP: BatchNorm statistics over the global batch (one process's)
    threads: int | None = None  # torch threads; None: chosen from the job's cores (convnn.train.threads)


@dataclass
class LoggerConfig:
    name: str = "csv"
    project: str = "convnn"
    entity: str | None = None
    group: str | None = None
    mode: str = "auto"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0


@dataclass
class SchedulerConfig:
    name: str = "none"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    step_size: int = 30
    gamma: float = 0.1


@dataclass
class CheckpointConfig:
    enabled: bool = True
    keep: bool = True


@dataclass
class TrainConfig:
    """The whole ``convnn-train`` config (``configs/train.yaml`` and its groups)."""

    name: str = "default"
    seed: int = 0
    resume: bool = True
    overwrite: bool = False
    out_dir: str = "runs"
    budget: str = "full"
    epochs: int = 150
    batch_size: int = 256
    eval_batch_size: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    layer: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SCHEMA_NAME = "train_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig, provider="convnn")
"""``configs/train.yaml`` starts from this schema (its first default), so Hydra checks keys and types
while composing and the defaults live in the dataclasses above only."""


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid config: {key}={value!r}; allowed: {allowed}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(key, value, f"one of {list(allowed)}")


def _at_least(key: str, value: float | None, low: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or not math.isfinite(value) or value < low:
        finite = "a finite value " if value is not None and not math.isfinite(value) else ""
        raise _fail(key, value, f"{finite}>= {low}" + (" or null" if optional else ""))


def _seed(key: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise _fail(key, value, f"an integer in [0, {MAX_SEED}]")


def _check_values(cfg: TrainConfig) -> None:
    d, t, o, s = cfg.data, cfg.trainer, cfg.optim, cfg.scheduler
    _choice("data.name", d.name, DATASETS)
    _choice("data.format", d.format, DATA_FORMATS)
    _choice("data.augment", d.augment, AUGMENTATIONS)
    _choice("trainer.accelerator", t.accelerator, ACCELERATORS)
    _choice("trainer.strategy", t.strategy, STRATEGIES)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.progress_bar", t.progress_bar, PROGRESS_BARS)
    _choice("logger.name", cfg.logger.name, LOGGERS)
    _choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    _choice("optim.name", o.name, OPTIMIZERS)
    _choice("scheduler.name", s.name, SCHEDULERS)
    for key, value, low in (
        ("epochs", cfg.epochs, 1),
        ("batch_size", cfg.batch_size, 1),
        ("data.num_classes", d.num_classes, 2),
        ("data.image_size", d.image_size, 1),
        ("data.in_channels", d.in_channels, 1),
        ("trainer.devices", t.devices, 1),
        ("trainer.num_nodes", t.num_nodes, 1),
        ("optim.weight_decay", o.weight_decay, 0.0),
        ("optim.momentum", o.momentum, 0.0),
        ("scheduler.warmup_epochs", s.warmup_epochs, 0),
        ("scheduler.min_lr", s.min_lr, 0.0),
        ("scheduler.step_size", s.step_size, 1),
    ):
        _at_least(key, value, low)
    _at_least("data.num_workers", d.num_workers, 0, optional=True)
    for key, value in (
        ("eval_batch_size", cfg.eval_batch_size),
        ("data.subset.train", d.subset.train),
        ("data.subset.test", d.subset.test),
        ("data.train_size", d.train_size),
        ("data.test_size", d.test_size),
        ("trainer.threads", t.threads),
    ):
        _at_least(key, value, 1, optional=True)
    _seed("seed", cfg.seed)
    _seed("data.subset.seed", d.subset.seed)
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise _fail("optim.lr", o.lr, "> 0 (finite)")
    if o.grad_clip is not None and not (math.isfinite(o.grad_clip) and o.grad_clip > 0):
        raise _fail("optim.grad_clip", o.grad_clip, "> 0 (finite) or null (no clipping)")
    if not 0 <= o.label_smoothing < 1:
        raise _fail("optim.label_smoothing", o.label_smoothing, "[0, 1)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise _fail("optim.betas", o.betas, "two values in [0, 1)")
    if not 0 < s.gamma <= 1:
        raise _fail("scheduler.gamma", s.gamma, "(0, 1]")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) != d.in_channels:
            raise _fail(key, values, f"{d.in_channels} values (one per data.in_channels)")
    if not all(math.isfinite(v) for v in d.mean):
        raise _fail("data.mean", d.mean, "finite values")
    if not all(math.isfinite(v) and v > 0 for v in d.std):
        raise _fail("data.std", d.std, "finite values > 0")
    if d.name != "synthetic" and not d.root:
        raise _fail("data.root", d.root, "a directory (set data.root= or $CONVNN_DATA_ROOT)")
    if "name" not in cfg.layer:
        raise _fail("layer.name", None, "a registered layer name (pick one with layer=<name>)")


def validate_config(cfg: DictConfig | dict) -> TrainConfig:
    """Check ``cfg`` against ``TrainConfig`` (keys, types, ranges); ``ConfigError`` on the first problem."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        typed = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        parent = e.full_key.rpartition(".")[0]
        node = OmegaConf.select(schema, parent) if parent else schema
        allowed = list(node.keys()) if isinstance(node, DictConfig) else []
        raise ConfigError(f"invalid config: unknown key {e.full_key!r}; allowed keys: {allowed}") from None
    except OmegaConfBaseException as e:
        value = OmegaConf.select(OmegaConf.create(cfg), e.full_key) if e.full_key else None
        reason = str(e).splitlines()[0]
        raise ConfigError(f"invalid config: {e.full_key}={value!r}; {reason}") from None
    _check_values(typed)
    return typed


def check_layer_options(layer_cfg: dict[str, Any]) -> None:
    """Check ``layer.*`` option names and types with the layer registry (from the builder's
    signature; ``layer.k=nine`` fails, also for branching's ConvNN options). Value ranges are left
    to the layer constructors."""
    from convnn.layers import layer_entry

    options = {k: v for k, v in layer_cfg.items() if k != "name"}
    try:
        layer_entry(layer_cfg["name"]).check_options(options)
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None

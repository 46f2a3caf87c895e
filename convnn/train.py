"""``convnn-train``: the Hydra entry point that trains one backbone x layer x dataset and records it.

    convnn-train experiment=quickstart
    convnn-train model=vgg11 layer=branching layer.ratio=0.5 data=cifar10 budget=smoke
    convnn-train -m experiment=paper/table1 budget=smoke

Order of work: validate the config, build the model (so bad options stop with a one-line message
before any data is read), profile it, then train with Lightning and keep ``results.json`` (see
``convnn.records``) up to date in the run directory ``<out_dir>/<experiment>/<overrides>``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from convnn.config import ConfigError, TrainConfig, check_layer_options, validate_config
from convnn.records import RECORD_NAME, SCHEMA_VERSION, read_record
from convnn.slurm import job_info, lightning_plugins, remove_hpc_checkpoints
from convnn.sweep import run_state

if TYPE_CHECKING:
    from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROG = "convnn-train"

RUN_DIR_EXCLUDED = {
    "experiment",
    "resume",
    "name",
    "out_dir",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "logger",
    "trainer",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.compile",
    "trainer.progress_bar",
}
RUN_DIR_EXCLUDED_PREFIXES = ("hydra.", "hydra/", "logger.", "checkpoint.")
MAX_SUBDIR = 200


def run_subdir(overrides: list[str]) -> str:
    """The run's directory name from its overrides: sorted ``key=value`` joined by ``,`` (``/`` -> ``-``).

    Overrides that do not change what is computed (data location, logger, device, ``resume``, the
    experiment itself, which names the parent directory) are left out, so a re-launch or
    ``resume=true`` finds the same directory. No overrides gives ``default``; names longer than 200
    characters are shortened and suffixed with a hash of the full name.
    """
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RUN_DIR_EXCLUDED or key.startswith(RUN_DIR_EXCLUDED_PREFIXES):
            continue
        kept.append(override.lstrip("+~").replace("/", "-"))
    name = ",".join(sorted(kept)) or "default"
    if len(name) > MAX_SUBDIR:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = f"{name[: MAX_SUBDIR - 13]}-{digest}"
    return name


def experiment_name(choice: str | None) -> str:
    """The experiment's name (``paper/table1``) for the run directory; ``default`` without one."""
    return choice or "default"


OmegaConf.register_new_resolver("convnn_run_subdir", run_subdir, replace=True)
OmegaConf.register_new_resolver("convnn_experiment", experiment_name, replace=True)


def _fail(message: str) -> SystemExit:
    """Print ``message`` as one line to stderr; the ``SystemExit`` (status 2) to raise."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return SystemExit(2)


def preflight(args: list[str]) -> None:
    """Compose the config once before Hydra does, turning composition errors (an unknown key, a
    missing group option) into one line. Multirun, sweeps and Hydra flags are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in args):
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return
    if any(o.is_sweep_override() or o.key_or_group.startswith("hydra") for o in parsed):
        return
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            compose("train", overrides=args)
        except (HydraException, OmegaConfBaseException) as e:
            raise _fail(_composition_message(e, args, compose)) from None
    GlobalHydra.instance().clear()


def _composition_message(error: Exception, args: list[str], compose: Any) -> str:
    """One line for a Hydra composition error: the unknown key or group option and what is allowed."""
    text = " ".join(str(error).split())
    missing = re.search(
        r"Could not find '([^']+)/([^'/]+)'.*?Available options in '[^']+':(.*?)(Config search|$)", text
    )
    if missing:
        group, option, options = missing.group(1), missing.group(2), missing.group(3).split()
        return f"invalid config: {group}={option!r}; allowed: {options}"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if not unknown:
        return f"invalid config: {text}"
    key = unknown.group(1)
    value = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == key), None)
    rest = [a for a in args if a.split("=", 1)[0] != key]
    parent = key.rpartition(".")[0]
    try:
        cfg = compose("train", overrides=rest)
    except Exception:  # noqa: BLE001 - another override is broken too; then list nothing
        cfg = None
    node = OmegaConf.select(cfg, parent) if cfg is not None and parent else cfg
    where = f"'{parent}'" if parent else "the top level"
    allowed = f"; allowed keys at {where}: {list(node.keys())}" if isinstance(node, DictConfig) else ""
    return f"invalid config: unknown key '{key}' (={value}){allowed}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=CONFIG_DIR.parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    packages = (
        "convnn",
        "torch",
        "torchvision",
        "lightning",
        "torchmetrics",
        "hydra-core",
        "wandb",
        "fvcore",
    )
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.trainer.accelerator in ("gpu", "auto") and torch.cuda.is_available():
        gpus = cfg.trainer.devices * cfg.trainer.num_nodes
        return f"{gpus}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_model_or_fail(cfg: TrainConfig) -> tuple[nn.Module, int]:
    """The backbone for ``cfg`` and its input side ``S`` (it maps ``[B, C, S, S] -> [B, classes]``);
    bad model / layer options exit with one line naming them."""
    from convnn.models import build_model, input_size

    try:
        check_layer_options(cfg.layer)
        model = build_model(
            cfg.model, cfg.layer, cfg.data.num_classes, cfg.data.image_size, cfg.data.in_channels
        )
    except ConfigError as e:
        raise _fail(str(e)) from None
    except (ValueError, TypeError) as e:
        raise _fail(
            f"invalid config: model={cfg.model.get('name')} layer={cfg.layer.get('name')}: {e}"
        ) from None
    return model, input_size(cfg.model, cfg.data.image_size)


def _per_device_batch(cfg: TrainConfig) -> tuple[int, int]:
    """``batch_size`` is global (the paper's 256); split evenly over devices x nodes."""
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    for key, value in (("batch_size", cfg.batch_size), ("eval_batch_size", eval_batch)):
        if value % world:
            raise _fail(f"invalid config: {key}={value}; allowed: a multiple of devices x nodes = {world}")
    return cfg.batch_size // world, eval_batch // world


def run(cfg: DictConfig) -> float | None:
    """Train one run described by the composed Hydra ``cfg``; returns the final test top-1 (%)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    record_path = run_dir / RECORD_NAME
    try:
        typed = validate_config(cfg)
    except ConfigError as e:
        raise _fail(str(e)) from None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    state = run_state(run_dir, resolved) if typed.resume else "new"
    if state == "finished":
        done = read_record(record_path)
        print(f"{PROG}: {run_dir} already finished; nothing to do (resume=true)")
        print_summary(done)
        return done["final"]["test_acc1"]
    if state == "stale":
        print(f"{PROG}: {record_path} was made with another config; starting afresh instead of resuming")
        typed.resume = False

    import lightning as L

    L.seed_everything(typed.seed, workers=True, verbose=False)
    model, image_size = build_model_or_fail(typed)
    batch, eval_batch = _per_device_batch(typed)
    record = {
        "schema": SCHEMA_VERSION,
        "status": "running",
        "error": None,
        "config": resolved,
        "experiment": typed.name,
        "overrides": list(hc.overrides.task),
        "run_dir": str(run_dir),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "device": _device(typed),
        "slurm": job_info(),
        "seed": typed.seed,
        "budget": typed.budget,
        **_profile(model, typed, image_size),
        "epochs": [],
        "final": None,
        "best": None,
        "wall_time_s": 0.0,
        "started_at": _now(),
        "finished_at": None,
    }
    L.seed_everything(typed.seed, workers=True, verbose=False)
    return _fit(typed, model, image_size, batch, eval_batch, record, record_path, resolved)


def _profile(model: nn.Module, cfg: TrainConfig, image_size: int) -> dict[str, Any]:
    from convnn.profile import profile_model

    stats = profile_model(model, (1, cfg.data.in_channels, image_size, image_size))
    return {
        k: stats[k] for k in ("params", "trainable_params", "gflops", "gflops_profiler", "unsupported_ops")
    }


def _fit(
    cfg: TrainConfig,
    model: nn.Module,
    image_size: int,
    batch: int,
    eval_batch: int,
    record: dict[str, Any],
    record_path: Path,
    resolved: dict[str, Any],
) -> float | None:
    """Train ``model`` on ``cfg.data`` with Lightning, keeping ``record`` current at ``record_path``;
    resumes from ``checkpoints/last.ckpt`` when ``resume=true``. Returns the final test top-1 (%)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from convnn.callbacks import LAST_CHECKPOINT, RecordCallback, build_callbacks
    from convnn.data import ImageDataModule
    from convnn.loggers import build_logger, close_logger, log_accounting
    from convnn.module import ImageClassifier

    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own; no duplicates
    run_dir = record_path.parent
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / f"{LAST_CHECKPOINT}.ckpt"
    resume_from = str(last) if cfg.resume and last.is_file() else None
    is_zero = rank_zero_only.rank == 0
    if resume_from and record_path.is_file():
        previous = read_record(record_path)
        record["started_at"] = previous.get("started_at") or record["started_at"]
        record["wall_time_s"] = previous.get("wall_time_s") or 0.0
    elif is_zero and ckpt_dir.is_dir():
        for stale in ckpt_dir.glob("*.ckpt"):
            stale.unlink()
    for hpc in remove_hpc_checkpoints(run_dir):  # every rank: Lightning would restore it (SLURM)
        print(f"{PROG}: removed {hpc} (Lightning's auto-requeue checkpoint; submitit owns requeueing)")
    if cfg.trainer.compile:
        model.compile()
    module = ImageClassifier(model, cfg.data.num_classes, cfg.epochs, cfg.optim, cfg.scheduler, cfg.seed)
    data = ImageDataModule(cfg.data, image_size, batch, eval_batch, seed=cfg.seed)
    recorder = RecordCallback(record, record_path, enabled=is_zero)
    logger = build_logger(cfg.logger, run_dir, cfg.name, run_dir.name, resolved)
    trainer = _build_trainer(cfg, run_dir, logger, [recorder, *build_callbacks(cfg, ckpt_dir)])
    log_accounting(logger, record)
    start = time.perf_counter()
    recorder.start(start)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    except BaseException as e:
        recorder.finish(module.history, time.perf_counter() - start, error=_failure(e))
        close_logger(logger, recorder.record)
        if isinstance(e, FileNotFoundError):
            raise _fail(str(e)) from None
        raise
    interrupted = "interrupted (KeyboardInterrupt)" if trainer.interrupted else None
    recorder.finish(module.history, time.perf_counter() - start, error=interrupted)
    close_logger(logger, recorder.record)
    if interrupted:
        raise _fail(f"{interrupted}; continue it with resume=true")
    if is_zero and not cfg.checkpoint.keep:
        for ckpt in ckpt_dir.glob("*.ckpt"):
            ckpt.unlink()
    if is_zero:
        print_summary(recorder.record)
    final = recorder.record["final"]
    return final["test_acc1"] if final else None


def _failure(error: BaseException) -> str:
    """The record's ``error`` for an exception out of ``trainer.fit``, naming the scheduler's signals."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, SIGTERMException):
        return "SIGTERM: cancelled or pre-empted by the scheduler (scancel, time limit, node failure)"
    if isinstance(error, SystemExit) and error.code == -1 and os.environ.get("SUBMITIT_EXECUTOR"):
        return "requeued by submitit (time limit or pre-emption): resumes from its last checkpoint"
    return f"{type(error).__name__}: {error}"


def _build_trainer(cfg: TrainConfig, run_dir: Path, logger: Any, callbacks: list) -> Any:
    """The Lightning ``Trainer`` for ``cfg``: the paper's gradient clipping, no sanity validation."""
    import lightning as L

    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision="bf16-mixed" if t.precision == "bf16" else "32-true",
        deterministic=t.deterministic,
        max_epochs=cfg.epochs,
        gradient_clip_val=cfg.optim.grad_clip,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar != "none",
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        plugins=lightning_plugins(),
        log_every_n_steps=1,  # nothing is logged per step; this only silences a warning
    )


def print_summary(record: dict[str, Any]) -> None:
    """A rich table of one run record: what ran, its size and cost, and its test results."""
    from rich.console import Console
    from rich.table import Table

    cfg = record["config"]
    final, best = record.get("final") or {}, record.get("best") or {}
    rows = [
        ("run", record["run_dir"]),
        ("status", record["status"]),
        ("model / layer / data", f"{cfg['model']['name']} / {cfg['layer']['name']} / {cfg['data']['name']}"),
        ("budget", f"{record['budget']} ({len(record['epochs'])} of {cfg['epochs']} epochs)"),
        ("params", f"{record['params']:,}"),
        ("GFLOPs fvcore / profiler", f"{record['gflops']:.3f} / {record['gflops_profiler']:.3f}"),
    ]
    if final:
        rows += [
            ("final test loss", f"{final['test_loss']:.3f}"),
            ("final test acc@1 / @5 (%)", f"{final['test_acc1']:.2f} / {final['test_acc5']:.2f}"),
            ("best test acc@1 (%)", f"{best['test_acc1']:.2f} (epoch {best['epoch']})"),
        ]
    rows.append(("wall time (s)", f"{record['wall_time_s']:.1f}"))
    table = Table(title="convnn-train summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_app(cfg: DictConfig) -> float | None:
    return run(cfg)


def main() -> None:
    """Console entry point ``convnn-train``."""
    preflight(sys.argv[1:])
    _hydra_app()


if __name__ == "__main__":
    main()

"""``convnn-train``: the Hydra entry point that trains one backbone x layer x dataset and records it.

    convnn-train experiment=quickstart
    convnn-train model=vgg11 layer=branching layer.ratio=0.5 data=cifar10 budget=smoke
    convnn-train -m experiment=paper/table1 budget=smoke

Order of work: validate the config, build the model (so bad options stop with a one-line message
before any data is read), profile it, then train with Lightning and keep ``results.json`` (see
``convnn.runs.records``) up to date in the run directory ``<out_dir>/<experiment>/<run name>`` (the
name a function of the run identity and seed, :func:`convnn.runs.rundir.run_name`). Users' guide:
docs/runs.md.
"""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from convnn import paths
from convnn.cli import MULTIRUN, compose_or_fail, fail
from convnn.provenance import git_commit
from convnn.runs.errors import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    RunError,
    unwritable,
)
from convnn.runs.identity import effective_budget, run_identity
from convnn.runs.lock import RunLock, RunLockedError
from convnn.runs.records import RECORD_NAME, RunRecord, atomic_write
from convnn.runs.rundir import earlier_run_dirs  # also registers the resolvers configs/train.yaml uses
from convnn.runs.slurm import job_info, lightning_plugins, remove_hpc_checkpoints, requeued_by_submitit
from convnn.runs.sweep import RunState, run_state
from convnn.train import help  # noqa: F401 - registers the resolver of the --help page
from convnn.train.allocator import keep_freed_memory, tuning_wanted
from convnn.train.config import ConfigError, TrainConfig, validate_config
from convnn.train.device import describe_device, resolve_accelerator
from convnn.train.quiet import filter_known_warnings
from convnn.train.streams import drop_output_to_closed_pipes
from convnn.train.threads import ThreadPlan
from convnn.train.threads import apply as apply_threads
from convnn.train.threads import plan as plan_threads
from convnn.train.threads import prepare as prepare_threads

if TYPE_CHECKING:
    from torch import nn

    from convnn.train.data import DataFeed
    from convnn.train.distributed import Start

CONFIG_DIR = paths.CONFIG_DIR
PROG = "convnn-train"


_keep_above: Path | None = None
"""The nearest directory above this command's run directory that existed before Hydra made it
(set by :func:`preflight`; else ``out_dir`` is kept): a refused run removes the empty directories
made below it."""


def _check_syntax(args: list[str]) -> None:
    """One line for an override Hydra's grammar cannot parse (Hydra prints five), with the fix for
    the usual cause: non-ASCII characters (``out_dir=/data/résumé``) must be quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except HydraException as e:
            key, _, value = arg.partition("=")
            hint = (
                f"; quote values with non-ASCII characters: '{key}=\"{value}\"'"
                if not value.isascii()
                else ""
            )
            reason = str(e).strip().splitlines()[0]
            raise fail(PROG, f"cannot parse override {arg!r} ({reason}){hint}") from None


def preflight(args: list[str]) -> None:
    """Compose the config once before Hydra does (:func:`convnn.cli.compose_or_fail`: composition
    errors in one line), after checking each override's syntax (:func:`_check_syntax`), and check that
    ``out_dir`` is writable; for a single run also the values the config check refuses, before
    anything is written. Other flags, sweeps and ``hydra`` overrides are left to Hydra."""
    global _keep_above
    _keep_above = None
    _check_syntax(args)
    cfg = compose_or_fail(PROG, "train", args, hydra=True)
    if cfg is None:
        return
    problem = unwritable(Path(str(cfg.out_dir)))
    if problem:
        raise fail(PROG, f"out_dir={str(cfg.out_dir)!r} is not writable ({problem})")
    if any(a in MULTIRUN for a in args):  # each job is checked when it starts
        return
    HydraConfig.instance().set_config(cfg)
    try:  # before Hydra makes the run directory: a refused value touches nothing on disk
        checked_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except ConfigError as e:
        raise fail(PROG, str(e)) from None
    _keep_above = _existing_ancestor(cfg)


def _existing_ancestor(cfg: DictConfig) -> Path | None:
    """The nearest existing directory above the run directory ``cfg`` (composed with its ``hydra``
    node, set as the Hydra config) names; ``None`` when the name cannot be worked out yet."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        run_dir = Path(str(cfg.hydra.run.dir)).absolute()
    except OmegaConfBaseException:
        return None
    return next(p for p in run_dir.parents if p.exists())


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


def build_model_or_fail(cfg: DictConfig) -> tuple[nn.Module, int]:
    """The backbone for ``cfg`` and its input side ``S`` (it maps ``[B, C, S, S] -> [B, classes]``),
    from :func:`convnn.models.build_from_config`; a bad option or one that does not fit the input
    size raises ``RunError`` with one line naming it."""
    from convnn.models import build_from_config

    try:
        model, (_, size, _) = build_from_config(cfg, check_input=True)
    except (ValueError, TypeError) as e:
        raise RunError(
            f"invalid config: model={cfg.model.get('name')} layer={cfg.layer.get('name')}: {e}"
        ) from None
    return model, size


def _per_device_batch(cfg: TrainConfig) -> tuple[int, int]:
    """``batch_size`` is global (the paper's 256): each of the devices x nodes ranks gets an equal part."""
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    for key, value in (("batch_size", cfg.batch_size), ("eval_batch_size", eval_batch)):
        if value % world:
            raise RunError(f"invalid config: {key}={value}; allowed: a multiple of devices x nodes = {world}")
    return cfg.batch_size // world, eval_batch // world


def checked_config(cfg: DictConfig) -> TrainConfig:
    """:func:`~convnn.train.config.validate_config`, with ``trainer.accelerator`` resolved for this
    machine (``auto``: the GPU when one is visible); ``ConfigError`` with one line on a bad value. A CPU
    run with an explicit ``data.num_workers`` gets its OpenMP wait policy first, before torch loads
    (:func:`convnn.train.threads.prepare`)."""
    typed = validate_config(cfg)
    if typed.trainer.accelerator != "gpu" and typed.data.num_workers is not None:
        prepare_threads(_plan(typed, False, typed.data.num_workers))  # a passive wait: before torch loads
    typed.trainer.accelerator = resolve_accelerator(typed.trainer)
    return typed


def _validated(cfg: DictConfig) -> TrainConfig:
    """:func:`checked_config` and the SLURM task count (:func:`~convnn.train.distributed.
    check_slurm_tasks`); ``RunError`` with one line on a bad value."""
    from convnn.train.distributed import check_slurm_tasks

    try:
        typed = checked_config(cfg)
        check_slurm_tasks(typed.trainer)
    except (ConfigError, ValueError) as e:
        raise RunError(str(e)) from None
    return typed


def run(cfg: DictConfig) -> float | None:
    """Train one run described by the composed Hydra ``cfg``; returns the final test top-1 (%).

    Rank 0 holds the run directory's lock (:class:`convnn.runs.lock.RunLock`) for the whole run and
    decides what the launch does (:class:`~convnn.train.distributed.Start`); under DDP the other
    ranks follow it (:mod:`convnn.train.distributed`). A ``RunError`` that stops the run before it is
    accepted leaves the disk as it was: nothing is written before (``.hydra/`` neither), and the empty
    directories Hydra made are removed (:func:`_remove_empty_dirs`).
    """
    from convnn.train.distributed import Start, announce_start, follow_start, launch_rank

    filter_known_warnings()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    keep = _keep_above or Path(str(cfg.out_dir)).absolute()
    try:
        typed = _validated(cfg)
    except RunError:
        _remove_empty_dirs(run_dir, keep)
        raise
    if launch_rank(typed.trainer) != 0:
        start = follow_start(typed.trainer)
        if start.action == "train":
            return _train(cfg, typed, run_dir, start, None)
        return start.final
    try:
        with _adopt_earlier_run(cfg, run_dir) or RunLock(run_dir) as lock:
            if lock.previous:
                old = lock.previous
                print(f"{PROG}: took over the stale lock of pid {old.get('pid')} on {old.get('host')}")
            try:
                start, state = _decide(cfg, typed, run_dir)
            except BaseException:  # the SLURM tasks waiting for the decision stop too
                announce_start(Start("stop"), typed.trainer)
                raise
            announce_start(start, typed.trainer)
            if start.action == "finished":
                return start.final
            return _train(
                cfg, typed, run_dir, start, state.record if start.resume_epoch is not None else None
            )
    except RunLockedError as e:
        announce_start(Start("stop"), typed.trainer)
        _remove_empty_dirs(run_dir, keep)
        raise RunError(str(e), EXIT_BUSY) from None
    except RunError:
        _remove_empty_dirs(run_dir, keep)
        raise


def _plan(cfg: TrainConfig, gpu: bool, workers: int) -> ThreadPlan:
    """This job's torch threads (:mod:`convnn.train.threads`) beside ``workers`` loader workers when
    training on the GPU (``gpu``) or the CPU."""
    t = cfg.trainer
    return plan_threads(gpu, t.devices, t.threads, workers, cfg.data.num_workers is not None)


def _remove_empty_dirs(run_dir: Path, keep: Path) -> None:
    """Remove ``run_dir`` if it is empty (what Hydra made for a refused run) and the empty directories
    above it, up to ``keep`` (kept)."""
    for path in (run_dir, *run_dir.parents):
        if path == keep or keep not in path.parents:
            return
        try:
            path.rmdir()
        except OSError:  # not empty (another run, another process): kept
            return


def _adopt_earlier_run(cfg: DictConfig, run_dir: Path) -> RunLock | None:
    """A run of this identity and seed in another directory of the experiment (one named by its
    override text by older versions, or by an older readable part: :func:`convnn.runs.rundir.
    earlier_run_dirs`) is moved to ``run_dir`` (still empty), holding its lock; that lock, held, is
    returned. ``None`` when there is no such run (or another process holds it: the move is left to it)."""
    if any(run_dir.iterdir()):
        return None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for earlier in earlier_run_dirs(run_dir, list(HydraConfig.get().overrides.task)):
        if not (earlier / RECORD_NAME).is_file():
            continue
        if run_state(earlier, resolved).name in ("new", "stale", "corrupt"):
            continue
        lock = RunLock(earlier)
        try:
            lock.__enter__()
            if not (earlier / RECORD_NAME).is_file():  # another process moved it meanwhile
                raise FileNotFoundError(earlier / RECORD_NAME)
            lock.move(run_dir)
        except (RunLockedError, OSError):
            lock.release()
            _remove_empty_dirs(earlier, earlier.parent)
            return None
        print(f"{PROG}: moved {earlier} to {run_dir} (run directories are named by run identity and seed)")
        return lock
    return None


def _start_state(
    typed: TrainConfig, run_dir: Path, resolved: dict[str, Any], explicit_resume: bool
) -> RunState:
    """What this launch does with ``run_dir``: ``new`` / ``unfinished`` (resume) or it stops.

    A finished run is reported (``finished``); a stale, blocked or corrupt one stops with one line
    unless ``overwrite=true``, which makes every state ``new``.
    """
    state = run_state(run_dir, resolved)
    if typed.overwrite and state.name != "new":
        print(f"{PROG}: overwrite=true: starting {run_dir} afresh")
        return RunState("new")
    if state.name == "corrupt":
        raise RunError(state.reason)
    if state.name == "stale":
        raise RunError(f"{run_dir} holds a different run ({state.reason}); overwrite=true replaces it")
    if state.name == "blocked":
        raise RunError(
            f"{run_dir} cannot be resumed ({state.reason}); overwrite=true starts it afresh", EXIT_FAILED
        )
    if state.name == "unfinished" and not typed.resume:
        raise RunError(
            f"{run_dir} holds an unfinished run ({state.reason}); resume=true continues it, "
            "overwrite=true starts it afresh"
        )
    if state.name == "new" and explicit_resume:
        print(f"{PROG}: nothing to resume in {run_dir}; starting a new run")
    return state


def _decide(cfg: DictConfig, typed: TrainConfig, run_dir: Path) -> tuple[Start, RunState]:
    """Rank 0, holding the lock: what this launch does (:class:`Start`) and the run's state."""
    from convnn.runs.checkpoints import LAST_CHECKPOINT
    from convnn.train.distributed import Start

    resolved = OmegaConf.to_container(cfg, resolve=True)
    explicit_resume = any(
        o.split("=", 1)[0].lstrip("+") == "resume" for o in HydraConfig.get().overrides.task
    )
    state = _start_state(typed, run_dir, resolved, explicit_resume)
    if state.name == "finished":
        print(f"{PROG}: {run_dir} already finished; nothing to do (overwrite=true trains it again)")
        print_summary(state.record, run_dir)
        return Start("finished", final=(state.record["final"] or {}).get("test_acc1")), state
    resume_epoch = None
    if state.name == "unfinished":
        resume_epoch = _checked_checkpoint(run_dir / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt", state.record)
    return Start("train", resume_epoch=resume_epoch), state


def _train(
    cfg: DictConfig, typed: TrainConfig, run_dir: Path, start: Start, previous: dict[str, Any] | None
) -> float | None:
    """Build the model and data and train them as ``start`` says (every rank); rank 0 first clears a
    fresh start's old outputs and creates the record (continuing ``previous`` on a resume)."""
    import lightning as L

    from convnn.runs.checkpoints import LAST_CHECKPOINT
    from convnn.train.data import ImageDataModule, data_feed
    from convnn.train.distributed import launch_rank, session, synchronise_batchnorm, world_size
    from convnn.train.gpu import on_gpu

    lead = launch_rank(typed.trainer) == 0
    world = world_size(typed.trainer)
    L.seed_everything(typed.seed, workers=True, verbose=False)
    model, image_size = build_model_or_fail(cfg)
    eval_batch = _per_device_batch(typed)[1] * world
    gpu = on_gpu(typed.trainer)
    feed = data_feed(typed.data, gpu, typed.trainer.devices)
    threads = apply_threads(_plan(typed, gpu, feed.num_workers))
    data = ImageDataModule(typed.data, image_size, typed.batch_size, eval_batch, seed=typed.seed, feed=feed)
    try:
        data.prepare_data()
        data.setup("fit")
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    if len(data.test_set) < world:
        raise RunError(f"invalid config: {len(data.test_set)} test images cannot be split over {world} ranks")
    if lead and start.resume_epoch is None:
        _clear_outputs(run_dir)
        print(f"{PROG}: run directory {run_dir}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fields = _record_fields(typed, resolved, model, image_size, len(data.train_set), feed) if lead else {}
    if lead:
        fields["threads"] = threads.record()
        print(f"{PROG}: training on {fields['device']}")
    if world > 1 and typed.trainer.sync_batchnorm:
        model, synced = synchronise_batchnorm(model, on_gpu(typed.trainer))
        fields.get("distributed", {})["sync_batchnorm"] = synced > 0
    if lead:
        _save_hydra_config(run_dir, cfg)
    record = RunRecord.create(run_dir / RECORD_NAME, fields, previous=previous, enabled=lead)
    L.seed_everything(typed.seed, workers=True, verbose=False)
    ckpt = run_dir / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"
    resume_from = ckpt if start.resume_epoch is not None else None
    with session():
        return _fit(typed, model, data, record, resolved, resume_from, start)


def _record_fields(
    typed: TrainConfig,
    resolved: dict[str, Any],
    model: nn.Module,
    image_size: int,
    train_size: int,
    feed: DataFeed,
) -> dict[str, Any]:
    """What the record says of the run before it trains: config, identity, versions, where and how
    it runs (``numerics``; ``data_feed``: ``feed``; ``distributed``: world size, per-rank batches,
    images per training epoch of the ``train_size`` in the split, BatchNorm layers), size and cost."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from convnn.train.data import global_batch_sizes
    from convnn.train.distributed import world_size
    from convnn.train.gpu import numerics_record, on_gpu

    world = world_size(typed.trainer)
    batch, eval_batch = _per_device_batch(typed)
    return {
        "config": resolved,
        "identity": run_identity(resolved),
        "experiment": typed.name,
        "overrides": list(HydraConfig.get().overrides.task),
        "run_dir": str(HydraConfig.get().runtime.output_dir),
        "git_commit": git_commit(),
        "versions": _versions(),
        "device": describe_device(typed.trainer),
        "numerics": numerics_record(typed.trainer, on_gpu(typed.trainer)),
        "data_feed": feed.as_record(),
        "launcher": job_info() or {},
        "distributed": {
            "world_size": world,
            "batch_size_per_rank": batch,
            "eval_batch_size_per_rank": eval_batch,
            "train_images_per_epoch": sum(
                global_batch_sizes(train_size, typed.batch_size, world, train=True)
            ),
            "batchnorm_layers": sum(isinstance(m, _BatchNorm) for m in model.modules()),
            "sync_batchnorm": False,
            "ranks": [],
        },
        "seed": typed.seed,
        "budget": typed.budget,
        "effective_budget": effective_budget(resolved),
        **_profile(model, typed, image_size),
    }


def _save_hydra_config(run_dir: Path, cfg: DictConfig) -> None:
    """``<run_dir>/.hydra/``: the job's config, Hydra's config and the overrides, as Hydra writes them,
    written here once the run is accepted (``hydra.output_subdir`` is null so Hydra writes nothing)."""
    hydra_cfg = HydraConfig.instance().cfg
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_cfg),
        ("overrides.yaml", hydra_cfg.hydra.overrides.task),
    ):
        text = OmegaConf.to_yaml(node)
        atomic_write(run_dir / ".hydra" / name, lambda f, text=text: f.write(text))


def _checked_checkpoint(ckpt: Path, record: dict[str, Any]) -> int | None:
    """The epochs a readable ``ckpt`` holds (``None`` without one: the run starts afresh). An
    unreadable one marks the record failed (not resumable, its epoch history kept) and stops."""
    from convnn.runs.checkpoints import CheckpointError, checkpoint_epochs

    if not ckpt.is_file():
        print(f"{PROG}: no checkpoint to resume from in {ckpt.parent.parent}; starting it afresh")
        return None
    try:
        return checkpoint_epochs(ckpt)
    except CheckpointError as e:
        message = f"{e}; overwrite=true starts the run afresh"
        RunRecord(ckpt.parent.parent / RECORD_NAME, record).fail(message, resumable=False)
        raise RunError(message, EXIT_FAILED) from None


def _clear_outputs(run_dir: Path) -> None:
    """A fresh start: remove the checkpoints and CSV curves of an earlier run in ``run_dir``."""
    for stale in (run_dir / "checkpoints").glob("*.ckpt"):
        stale.unlink()
    (run_dir / "logs" / "metrics.csv").unlink(missing_ok=True)


def _profile(model: nn.Module, cfg: TrainConfig, image_size: int) -> dict[str, Any]:
    from convnn.models.accounting import profile_model

    stats = profile_model(model, (1, cfg.data.in_channels, image_size, image_size))
    return {
        k: stats[k] for k in ("params", "trainable_params", "gflops", "gflops_profiler", "unsupported_ops")
    }


def _fit(
    cfg: TrainConfig,
    model: nn.Module,
    data: Any,
    record: RunRecord,
    resolved: dict[str, Any],
    resume_from: Path | None,
    start: Start,
) -> float | None:
    """Train ``model`` on ``data`` with Lightning, keeping ``record`` current; continues from
    ``resume_from`` (a checkpoint after ``start.resume_epoch`` epochs) when given. Returns the final
    test top-1 (%). Divergence, signals and errors close the record and raise ``RunError``. Under DDP
    every rank runs this; only rank 0's record and logger write."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from convnn.train.callbacks import Diverged, RecordCallback, build_callbacks
    from convnn.train.distributed import RankRoster
    from convnn.train.loggers import build_logger, close_logger, log_accounting
    from convnn.train.module import ImageClassifier

    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own; no duplicates
    run_dir = record.path.parent
    if cfg.trainer.compile:
        model.compile()
    module = ImageClassifier(model, cfg.data.num_classes, cfg.epochs, cfg.optim, cfg.scheduler, cfg.seed)
    lead = record.enabled
    recorder = RecordCallback(record, verbose=lead)
    logger = build_logger(
        cfg.logger, run_dir, cfg.name, run_dir.name, resolved, keep_epochs=start.resume_epoch or 0
    )

    def close() -> None:
        if lead:
            close_logger(logger, record.data)

    for hpc in remove_hpc_checkpoints(run_dir):  # every rank, before Lightning looks for one
        print(f"{PROG}: removed {hpc} (Lightning's auto-requeue checkpoint; submitit owns requeueing)")
    callbacks = [recorder, RankRoster(record), *build_callbacks(cfg, run_dir / "checkpoints")]
    trainer = _build_trainer(cfg, run_dir, logger, callbacks, start, recorder.checkpoint_written)
    if lead:
        log_accounting(logger, record.data)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    except Diverged as e:
        record.diverge(e.epoch, str(e))
        close()
        raise RunError(f"diverged: {e}; lower optim.lr (overwrite=true reruns it)", EXIT_FAILED) from None
    except BaseException as e:
        if requeued_by_submitit(e):  # before the SIGINT check: Lightning marks any exit "interrupted"
            recorder.interrupt("SIGUSR2 (time limit or pre-emption: requeued by submitit, resumes)")
            close()
            raise
        sigint = isinstance(e, KeyboardInterrupt) or (type(e) is SystemExit and trainer.interrupted)
        if isinstance(e, SIGTERMException) or sigint:
            name, code = ("SIGINT", EXIT_SIGINT) if sigint else ("SIGTERM", EXIT_SIGTERM)
            recorder.interrupt(name)
            close()
            raise RunError(f"interrupted by {name}; continue it with resume=true", code) from None
        record.fail(" ".join(f"{type(e).__name__}: {e}".split()))
        close()
        if isinstance(e, OSError):  # a full disk, a corrupt image (also from a loader worker): one line
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise RunError(f"{last}; {_resume_hint(run_dir)}", EXIT_FAILED) from None
        raise
    record.finish()
    close()
    if lead and not cfg.checkpoint.keep:
        for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
            ckpt.unlink()
    if lead:
        print_summary(record.data, run_dir)
    final = record.data["final"]
    return final["test_acc1"] if final else None


def _resume_hint(run_dir: Path) -> str:
    """What ``resume=true`` does for the run in ``run_dir`` that just failed: continue from its last
    checkpoint where one was written, else start afresh (named as such, never a missing file)."""
    from convnn.runs.checkpoints import LAST_CHECKPOINT

    ckpt = run_dir / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"
    if ckpt.is_file():
        return f"resume=true continues from {ckpt}"
    return "no checkpoint was written: resume=true starts it afresh"


def _build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    logger: Any,
    callbacks: list,
    start: Start,
    checkpoint_written: Callable[[], None] | None = None,
) -> Any:
    """The Lightning ``Trainer`` for ``cfg``: the paper's gradient clipping, no sanity validation,
    checkpoints written atomically (``checkpoint_written``, where given, called after each),
    deterministic on a GPU unless ``trainer.deterministic=false``
    (:func:`~convnn.train.gpu.deterministic_mode`); under DDP :class:`~convnn.train.distributed.DDPStrategy`
    (further ranks get ``start``) and the data module's own per-rank batches (no ``DistributedSampler``)."""
    import lightning as L

    from convnn.runs.checkpoints import AtomicCheckpointIO
    from convnn.train.distributed import DDPStrategy, data_parallel
    from convnn.train.gpu import deterministic_mode, on_gpu

    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=DDPStrategy(start.env()) if data_parallel(t) else t.strategy,
        use_distributed_sampler=False,
        precision="bf16-mixed" if t.precision == "bf16" else "32-true",
        deterministic=deterministic_mode(t, on_gpu(t)),
        max_epochs=cfg.epochs,
        gradient_clip_val=cfg.optim.grad_clip,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar != "none",
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(checkpoint_written), *lightning_plugins()],
        log_every_n_steps=1,  # nothing is logged per step; this only silences a warning
    )


def _shown(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` where the record has none (a field may be absent
    or null in a valid record)."""
    return "-" if value is None else format(value, spec)


def print_summary(record: dict[str, Any], run_dir: Path) -> None:
    """A rich table of one run record (in ``run_dir``, where it is now: a moved run's record keeps
    the path it was written at): what ran, its size and cost, and its test results."""
    from rich.console import Console
    from rich.table import Table

    cfg = record["config"]
    final, best = record.get("final") or {}, record.get("best") or {}
    gflops = f"{_shown(record.get('gflops'), '.3f')} / {_shown(record.get('gflops_profiler'), '.3f')}"
    rows = [
        ("run", str(run_dir)),
        ("status", record["status"]),
        ("model / layer / data", f"{cfg['model']['name']} / {cfg['layer']['name']} / {cfg['data']['name']}"),
        ("budget", f"{record.get('budget')} ({len(record['epochs'])} of {cfg['epochs']} epochs)"),
        ("params", _shown(record.get("params"), ",")),
        ("GFLOPs fvcore / profiler", gflops),
    ]
    if final:
        acc = f"{_shown(final.get('test_acc1'), '.2f')} / {_shown(final.get('test_acc5'), '.2f')}"
        rows += [
            ("final test loss", _shown(final.get("test_loss"), ".3f")),
            ("final test acc@1 / @5 (%)", acc),
            ("best test acc@1 (%)", f"{_shown(best.get('test_acc1'), '.2f')} (epoch {best.get('epoch')})"),
        ]
    rows.append(("wall time (s)", _shown(record.get("wall_time_s"), ".1f")))
    table = Table(title="convnn-train summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_app(cfg: DictConfig) -> float | None:
    """One job: a ``RunError`` prints one line, then exits (single run) or fails the job (sweep).
    Each job process (local or a SLURM task) first keeps freed memory for reuse
    (:func:`~convnn.train.allocator.keep_freed_memory`)."""
    from hydra.types import RunMode

    keep_freed_memory()
    try:
        return run(cfg)
    except RunError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        raise SystemExit(e.code) from None


def main() -> None:
    """Console entry point ``convnn-train``."""
    drop_output_to_closed_pipes()
    try:
        tuning_wanted()
    except ValueError as e:
        raise fail(PROG, str(e)) from None
    preflight(sys.argv[1:])
    _hydra_app()


if __name__ == "__main__":
    main()

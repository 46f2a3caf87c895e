"""The ``paper`` sweeper: Hydra's basic sweeper plus ``rows`` (a union of override blocks),
``skip_finished`` (re-launching skips finished runs; ``convnn-train`` resumes died ones), ``dry_run``
(list and check the jobs, launch nothing), the projected GPU-hours (:mod:`convnn.runs.cost`) and a
final summary (finished / skipped / failed, with reasons; the sweep exits 1 when a job failed). Job expansion,
run states and the listings live in :mod:`convnn.runs.sweep`."""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf structured configs need these

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from convnn.runs.cost import sweep_cost
from convnn.runs.errors import EXIT_BUSY, unwritable
from convnn.runs.slurm import queued_jobs
from convnn.runs.sweep import JobOutcome, expand_jobs, format_jobs, format_summary, run_state
from hydra_plugins.convnn_sweeper.local_launcher import STOP_CODES, JobNotLaunched, LocalJobError

log = logging.getLogger(__name__)

LAUNCH_STATES = ("new", "unfinished")
SKIP_STATES = ("finished", "running")


@dataclass
class PaperSweeperConf:
    """``rows``: name -> space-separated overrides (may sweep); ``params``: shared Cartesian axes;
    ``local_parallelism``: at most this many jobs at once under ``hydra/launcher=local`` (null: one
    per GPU set of the pool for GPU jobs, what the cores and memory allow for CPU jobs)."""

    _target_: str = "hydra_plugins.convnn_sweeper.paper_sweeper.PaperSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    rows: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    skip_finished: bool = True
    dry_run: bool = False
    local_parallelism: Optional[int] = None  # noqa: UP045


ConfigStore.instance().store(group="hydra/sweeper", name="paper", node=PaperSweeperConf, provider="convnn")


def _job_error(value: Any) -> tuple[str, int | None]:
    """A failed job's reason (one line) and exit code (``RunError.code``; ``None`` for others)."""
    code = getattr(value, "code", None)
    plain = code is not None or isinstance(value, (LocalJobError, JobNotLaunched))  # already say it all
    text = str(value) if plain else f"{type(value).__name__}: {value}"
    return " ".join(text.split()), code if isinstance(code, int) else None


def _check_job(cfg: Any) -> str | None:
    """The dry run's check of one composed job: config values, layer options and the model's
    constructor (built on the meta device, no memory); the one-line error, or ``None``."""
    import torch

    from convnn.models import build_model
    from convnn.train.config import ConfigError, check_layer_options, validate_config

    try:
        typed = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
        check_layer_options(typed.layer)
        with torch.device("meta"):
            build_model(typed.model, typed.layer, typed.data.num_classes, typed.data.image_size)
    except ConfigError as e:
        return str(e)
    except (ValueError, TypeError) as e:
        return f"invalid config: {' '.join(str(e).split())}"
    return None


class PaperSweeper(BasicSweeper):
    """Launches ``rows x params`` (see :func:`convnn.runs.sweep.expand_jobs`) in batches."""

    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        rows: dict[str, str] | None = None,
        skip_finished: bool = True,
        dry_run: bool = False,
        local_parallelism: int | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = dict(rows) if rows else None
        self.skip_finished = skip_finished
        self.dry_run = dry_run
        self.local_parallelism = local_parallelism
        self.outcomes: list[JobOutcome] = []
        self.todo_configs: list[dict[str, Any]] = []  # the resolved config of each job to launch

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        """Set the Hydra config first: launcher fields (``submitit_folder``) interpolate
        ``hydra.sweep.dir``, which may use the ``${hydra:...}`` resolver."""
        HydraConfig.instance().set_config(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def plan(self, overrides: list[Override], check: bool = False) -> list[list[str]]:
        """The jobs to launch; the others go to ``self.outcomes``: a finished run, one another
        process holds or one this sweep submitted that SLURM still holds (pending, running,
        requeued) is skipped, a stale, blocked or corrupt one fails with its reason (unless the job
        sets ``overwrite=true``), and with ``check`` (the dry run) a job with a bad value fails."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = expand_jobs(self.rows, [o.input_line for o in overrides], parser)
        held = self._queued_run_dirs() if self.skip_finished else {}
        todo, self.todo_configs = [], []
        for job in jobs:
            cfg = self._job_config(job)
            error = _check_job(cfg) if check else None
            if error:
                self.outcomes.append(JobOutcome(tuple(job), "failed", error))
                continue
            run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
            if run_dir in held:
                self.outcomes.append(
                    JobOutcome(tuple(job), "skipped", f"queued or running: SLURM job {held[run_dir]}")
                )
                continue
            resolved = OmegaConf.to_container(
                OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
            )
            state = run_state(run_dir, resolved, check_lock=True) if self.skip_finished else None
            if (
                state is None
                or state.name in LAUNCH_STATES
                or any(o.lower() == "overwrite=true" for o in job)
            ):
                todo.append(job)
                self.todo_configs.append(resolved)
            elif state.name in SKIP_STATES:
                self.outcomes.append(JobOutcome(tuple(job), "skipped", state.reason or state.name))
            else:
                self.outcomes.append(JobOutcome(tuple(job), "failed", f"{state.name}: {state.reason}"))
        return todo

    def _job_config(self, job: list[str]) -> Any:
        """The composed config of one job (also set as the Hydra config: the run dir may use it)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
        HydraConfig.instance().set_config(cfg)
        return cfg

    def _queued_run_dirs(self) -> dict[Path, str]:
        """Run directory -> SLURM job id, for each job submitit submitted into this sweep's
        ``submitit_folder`` that SLURM still holds (see :func:`convnn.runs.slurm.queued_jobs`)."""
        folder = OmegaConf.select(self.config, "hydra.launcher.submitit_folder", default=None)
        if not folder:
            return {}
        held = {}
        for job_id, job in queued_jobs(str(folder)).items():
            cfg = self._job_config(job)
            held[Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)] = job_id
        HydraConfig.instance().set_config(self.config)
        return held

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        """Batches of the jobs to launch (called by ``BasicSweeper.sweep``): ``max_batch_size`` jobs
        each, else one batch (``hydra/launcher=local`` queues a batch itself, ``local_parallelism`` at
        a time)."""
        jobs = self.plan(overrides)
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def sweep(self, arguments: list[str]) -> Any:
        """Launch every job and print the summary (exit 1 if a job failed), or with ``dry_run`` print
        and check them and launch none."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        if self.dry_run:
            jobs = self.plan(parser.parse_overrides([*self._parse_config(), *arguments]), check=True)
            print(format_jobs(jobs, self.outcomes))
            print(sweep_cost(self.todo_configs).format())
            return []
        self.overrides = self.split_arguments(
            parser.parse_overrides([*self._parse_config(), *arguments]), self.max_batch_size
        )
        print(sweep_cost(self.todo_configs).format(), flush=True)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        problem = unwritable(sweep_dir)
        if problem:
            print(f"convnn-train: error: out_dir {sweep_dir} is not writable ({problem})", file=sys.stderr)
            sys.exit(2)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, index, stop = [], 0, None
        while not self.is_done() and stop is None:
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=index)
            index += len(batch)
            returns.append(results)
            for job, ret in zip(batch, results, strict=True):
                if ret.status == JobStatus.COMPLETED:
                    self.outcomes.append(JobOutcome(tuple(job), "finished"))
                    continue
                reason, code = _job_error(ret._return_value)
                # another process took the run after this sweep planned it (run once, by that
                # process), or the local queue stopped before the job's turn
                skipped = code == EXIT_BUSY or isinstance(ret._return_value, JobNotLaunched)
                status = "skipped" if skipped else "failed"
                self.outcomes.append(JobOutcome(tuple(job), status, reason))
                stop = code if code in STOP_CODES else stop
        print(format_summary(self.outcomes))
        if stop is not None:
            sys.exit(stop)
        if any(o.status == "failed" for o in self.outcomes):
            sys.exit(1)
        return returns

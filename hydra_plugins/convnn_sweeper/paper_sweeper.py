"""The ``paper`` sweeper: Hydra's basic sweeper plus ``rows`` (a union of override blocks),
``skip_finished`` (re-launching skips finished runs and resumes died ones) and ``dry_run`` (list the
jobs, launch nothing). Job expansion and the finished check live in :mod:`convnn.sweep`."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf structured configs need these

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from convnn.slurm import queued_overrides, without_resume
from convnn.sweep import COMPUTED_KEYS, expand_jobs, format_jobs, relaunch, run_state

log = logging.getLogger(__name__)


@dataclass
class PaperSweeperConf:
    """``rows``: name -> space-separated overrides (may sweep); ``params``: shared Cartesian axes."""

    _target_: str = "hydra_plugins.convnn_sweeper.paper_sweeper.PaperSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    rows: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    skip_finished: bool = True
    dry_run: bool = False


ConfigStore.instance().store(group="hydra/sweeper", name="paper", node=PaperSweeperConf, provider="convnn")


def _resolved(cfg: Any, keys: set) -> dict:
    """The top-level ``keys`` of ``cfg`` as resolved plain values."""
    return {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in keys
    }


class PaperSweeper(BasicSweeper):
    """Launches ``rows x params`` (see :func:`convnn.sweep.expand_jobs`) in batches."""

    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        rows: dict[str, str] | None = None,
        skip_finished: bool = True,
        dry_run: bool = False,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = dict(rows) if rows else None
        self.skip_finished = skip_finished
        self.dry_run = dry_run

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        """Set the Hydra config first: launcher fields (``submitit_folder``) interpolate
        ``hydra.sweep.dir``, which may use the ``${hydra:...}`` resolver."""
        HydraConfig.instance().set_config(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def plan(self, overrides: list[Override]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
        """``(jobs to launch, finished jobs, queued jobs)``. With ``skip_finished``, finished runs are
        left out, and so are jobs this sweep submitted that the scheduler still holds (pending, running
        or requeued: see :func:`convnn.slurm.queued_overrides`); a died run is relaunched with
        ``resume=true`` and a stale one (made with another config, e.g. a redefined budget) with
        ``resume=false``; see :func:`convnn.sweep.run_state`."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = expand_jobs(self.rows, [o.input_line for o in overrides], parser)
        if not self.skip_finished:
            return jobs, [], []
        queued = {without_resume(job) for job in queued_overrides(self._submitit_folder())}
        todo, done, held = [], [], []
        for job in jobs:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
            HydraConfig.instance().set_config(cfg)  # the run dir may interpolate ${hydra:...}
            run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
            state = run_state(run_dir, _resolved(cfg, {k.split(".")[0] for k in COMPUTED_KEYS}))
            if state == "finished":
                done.append(job)
            elif without_resume(job) in queued:
                held.append(job)
            else:
                todo.append(relaunch(job, state))
        return todo, done, held

    def _submitit_folder(self) -> str:
        """The launcher's ``submitit_folder`` (with ``%j``), resolved; empty without a submitit launcher."""
        HydraConfig.instance().set_config(self.config)
        return str(OmegaConf.select(self.config, "hydra.launcher.submitit_folder", default="") or "")

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        """Batches of the jobs to launch (called by ``BasicSweeper.sweep``)."""
        jobs, done, held = self.plan(overrides)
        if done:
            log.info("skipping %d finished runs", len(done))
        if held:
            log.info("skipping %d runs still queued or running on SLURM", len(held))
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def sweep(self, arguments: list[str]) -> Any:
        """Launch the jobs, or with ``dry_run`` print them (count and overrides) and launch none."""
        if not self.dry_run:
            return super().sweep(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs, done, held = self.plan(parser.parse_overrides([*self._parse_config(), *arguments]))
        if not self.skip_finished:  # otherwise plan() has composed every job already
            self.validate_batch_is_legal(jobs)
        print(format_jobs(jobs, done, held))
        return []

"""The ``paper`` sweeper: Hydra's basic sweeper plus ``rows`` (a union of override blocks) and
``dry_run`` (list the jobs, launch nothing). Job expansion lives in :mod:`convnn.sweep`."""

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional  # noqa: UP035 (OmegaConf needs typing generics)

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from convnn.sweep import expand_jobs, format_jobs

log = logging.getLogger(__name__)


@dataclass
class PaperSweeperConf:
    """``rows``: name -> space-separated overrides (may sweep); ``params``: shared Cartesian axes."""

    _target_: str = "hydra_plugins.convnn_sweeper.paper_sweeper.PaperSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    rows: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    dry_run: bool = False


ConfigStore.instance().store(group="hydra/sweeper", name="paper", node=PaperSweeperConf, provider="convnn")


class PaperSweeper(BasicSweeper):
    """Launches ``rows x params`` (see :func:`convnn.sweep.expand_jobs`) in batches."""

    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        rows: dict[str, str] | None = None,
        dry_run: bool = False,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = dict(rows) if rows else None
        self.dry_run = dry_run

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        """Batches of jobs; overrides here are the sweep ``params`` followed by the command line's."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [o.input_line for o in overrides]
        jobs = expand_jobs(self.rows, params, parser)
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def sweep(self, arguments: list[str]) -> Any:
        """Launch every job, or with ``dry_run`` print them (count and overrides) and launch none."""
        if not self.dry_run:
            return super().sweep(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        jobs = [job for batch in self.split_arguments(overrides, None) for job in batch]
        self.validate_batch_is_legal(jobs)
        print(format_jobs(jobs))
        return []

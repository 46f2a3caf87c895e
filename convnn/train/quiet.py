"""The known harmless warnings of a training run, filtered once, here (``filter_known_warnings``).

Each entry is a message prefix (a regex) of a warning that says nothing about the run: Lightning's
SLURM hint outside SLURM, a torch pytree deprecation inside Lightning, the notices that a resumed
run's checkpoint / log directory already exists (resuming is what we do), and the data-loader
worker-count advice (``data.num_workers`` is the user's choice); and Lightning's litlogger tip.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_WARNINGS = (
    r"The `srun` command is available on your system but is not used",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
    r"The '\w+_dataloader' does not have many workers",
)


KNOWN_LOG_LINES = ("litlogger",)  # Lightning's advertisement for its logging service


def _not_known(record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in KNOWN_LOG_LINES)


def filter_known_warnings() -> None:
    """Ignore every warning in ``KNOWN_WARNINGS`` and Lightning log line in ``KNOWN_LOG_LINES`` for
    the rest of the process."""
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_known not in rank_zero.filters:
        rank_zero.addFilter(_not_known)

"""Where a run lives: ``<out_dir>/<experiment>/<run subdir>``, the subdir named from the run's
overrides (:func:`run_subdir`); the Hydra resolvers ``convnn_run_subdir`` and ``convnn_experiment``
that ``configs/train.yaml`` uses for ``hydra.run.dir`` / ``hydra.sweep``."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

RUN_DIR_EXCLUDED = {
    "experiment",
    "resume",
    "overwrite",
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
    "trainer.threads",
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

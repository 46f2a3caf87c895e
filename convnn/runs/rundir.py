"""Where a run lives: ``<out_dir>/<experiment>/<run name>``, the run name a pure function of the run's
identity and seed (:func:`run_name`); the Hydra resolvers ``convnn_run_name`` and
``convnn_experiment`` that ``configs/train.yaml`` uses for ``hydra.run.dir`` / ``hydra.sweep``, so
``convnn-train`` and the sweeper place a run with the same function.

A run name reads like ``vgg11-branching-cifar10,layer.ratio=0.25,optim.lr=0.0001,epochs=150,
id=4f0c2a9e1b,seed=0``: the backbone, layer and dataset, the ``layer.*`` values that differ from the
layer's file in ``configs/layer/``, the learning rate and epochs, the ``model.*`` / ``data.*`` values
that differ from their files, then ``id`` (:func:`convnn.runs.identity.identity_key`) and the seed.
The readable part is a hint (shortened when long); ``id`` makes the name unique.

Why this and not the override text (older versions) or a diff from the experiment's defaults: the
override text names one run several ways (``seed=0`` written or not, a key given twice, bookkeeping
keys), and a diff from an experiment's defaults renames every run of it when the experiment file
changes. Here only the identity and seed decide; should an option file's default change (the
readable part with it, the ``id`` not), ``convnn-train`` finds the run by its ``id=...,seed=...``
(:func:`earlier_run_dirs`) and moves it to its new name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from convnn.paths import CONFIG_DIR
from convnn.runs.identity import BOOKKEEPING_KEYS, canonical, identity_key, run_identity, select

LABEL_GROUPS = ("layer", "model", "data")
LABEL_ORDER = ("layer", "optim.lr", "epochs", "model", "data")  # what sweeps vary most comes first
MAX_LABEL = 150
ID_DIGITS = 10
UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


@cache
def group_defaults(group: str, option: str) -> dict[str, Any]:
    """The values of ``configs/<group>/<option>.yaml`` (``{}`` when there is no such file)."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return run_identity({group: values}).get(group, {})


def _leaves(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def render(value: Any) -> str:
    """A value as it appears in a run name: integral numbers without ``.0`` (``0.0`` and ``0`` are one
    value), lists joined by ``+``, characters other than ``A-Z a-z 0-9 . _ + = -`` as ``-``."""
    value = canonical(value)
    if isinstance(value, bool) or value is None:
        text = str(value).lower().replace("none", "null")
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, list):
        text = "+".join(render(v) for v in value)
    else:
        text = str(value)
    return UNSAFE.sub("-", text)


def label(identity: Mapping[str, Any]) -> str:
    """The readable part of a run name from a run identity: ``<model>-<layer>-<data>``, then each
    ``layer.key=value`` that differs from the layer's option file, ``optim.lr``, ``epochs``, and the
    model's and data's differences likewise; cut at a ``,`` to at most ``MAX_LABEL`` characters."""
    names = [render(select(identity, f"{group}.name")) for group in ("model", "layer", "data")]
    parts = ["-".join(names)]
    for group in LABEL_ORDER:
        if group not in LABEL_GROUPS:
            parts.append(f"{group}={render(select(identity, group))}")
            continue
        node = identity.get(group) or {}
        defaults = _leaves(group_defaults(group, str(node.get("name"))), f"{group}.")
        for key, value in _leaves(node, f"{group}.").items():
            if key not in defaults or canonical(defaults[key]) != canonical(value):
                parts.append(f"{key}={render(value)}")
    text = ",".join(parts)
    if len(text) > MAX_LABEL:
        text = text[: MAX_LABEL - 4].rpartition(",")[0] + ",..."
    return text


def run_name(config: Mapping[str, Any]) -> str:
    """The run directory's name for a resolved training ``config``: a function of its run identity
    (:func:`convnn.runs.identity.run_identity`) and seed only, ``<label>,id=<identity key>,seed=<seed>``."""
    ident = run_identity(config)
    return f"{label(ident)},id={identity_key(config)[:ID_DIGITS]},seed={render(config.get('seed'))}"


def _run_name_resolver(*, _root_: DictConfig) -> str:
    """``${convnn_run_name:}``: :func:`run_name` of the composed config the resolver sits in (the
    ``hydra`` node and the top-level bookkeeping keys left out before resolving)."""
    dropped = {"hydra", *(k for k in BOOKKEEPING_KEYS if "." not in k and k != "seed")}
    kept = OmegaConf.masked_copy(_root_, [k for k in _root_ if k not in dropped])
    return run_name(OmegaConf.to_container(kept, resolve=True))


def experiment_name(choice: str | None) -> str:
    """The experiment's name (``paper/table1``) for the run directory; ``default`` without one."""
    return choice or "default"


LEGACY_EXCLUDED = {
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
LEGACY_EXCLUDED_PREFIXES = ("hydra.", "hydra/", "logger.", "checkpoint.")


def legacy_run_name(overrides: list[str]) -> str:
    """The name older versions gave a run directory: its overrides' text, sorted, ``,``-joined (the
    ones that change nothing computed left out, ``/`` as ``-``, ``default`` for none, a hash
    suffix past 200 characters). Used only to find such a directory and move it to :func:`run_name`
    (:func:`earlier_run_dirs`)."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in LEGACY_EXCLUDED or key.startswith(LEGACY_EXCLUDED_PREFIXES):
            continue
        kept.append(override.lstrip("+~").replace("/", "-"))
    name = ",".join(sorted(kept)) or "default"
    if len(name) > 200:
        name = f"{name[:187]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def earlier_run_dirs(run_dir: Path, overrides: list[str]) -> list[Path]:
    """Directories of the same experiment that may hold the run that belongs in ``run_dir``: those
    whose names end in the same ``id=...,seed=...`` (the readable part changed with an option file's
    default) and the override-named one older versions used (:func:`legacy_run_name`)."""
    same = sorted(
        p for p in run_dir.parent.glob(f"*,id={run_dir.name.rpartition(',id=')[2]}") if p != run_dir
    )
    legacy = run_dir.parent / legacy_run_name(overrides)
    return [*same, *([legacy] if legacy != run_dir else [])]


OmegaConf.register_new_resolver("convnn_run_name", _run_name_resolver, replace=True)
OmegaConf.register_new_resolver("convnn_experiment", experiment_name, replace=True)

"""The ``--help`` pages of ``convnn-train`` and ``convnn-profile``: Hydra's ``hydra/help`` templates
(``configs/hydra/help/``) call the ``convnn_help`` resolver registered here, which lays the page out
with :func:`convnn.cli.help_page` and leaves Hydra's ``$APP_CONFIG_GROUPS`` (every config group and
its options) in place. The keys come from the schema (:class:`convnn.train.config.TrainConfig`) and
the experiments from ``experiments/``, so the pages list what is there."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from convnn.cli import examples, experiments, help_page
from convnn.train.config import TrainConfig

GROUPS = "$APP_CONFIG_GROUPS"  # Hydra fills it in after the resolver ran

# Every field of TrainConfig, described (tests/test_cli.py checks the two agree).
KEY_TEXT = {
    "name": "the experiment's name, which names the runs' parent folder (set by experiment=)",
    "seed": "random seed of initialisation, data order and candidate sampling (0)",
    "resume": "true: continue an unfinished run from <run dir>/checkpoints/last.ckpt",
    "overwrite": "true: start the run afresh even over a finished or different run",
    "out_dir": "where runs go, <out_dir>/<experiment>/<overrides> ($CONVNN_RUNS_DIR, else runs)",
    "budget": "the budget's label (set by budget=)",
    "epochs": "training epochs",
    "batch_size": "global batch size, split over devices x nodes",
    "eval_batch_size": "test batch size (null: batch_size)",
    "data": "the dataset (data=):",
    "model": "the backbone's options (model=); `--cfg job model=<name>` lists them",
    "layer": "the layer's options (layer=); `--cfg job layer=<name>` lists them",
    "trainer": "devices and precision (trainer=):",
    "logger": "run logger (logger=):",
    "optim": "optimiser:",
    "scheduler": "learning-rate schedule:",
    "checkpoint": "checkpoints:",
}

PAGES = {
    "convnn-train": {
        "summary": "train one backbone x layer x dataset with the paper's recipe (or, with -m, a sweep) and "
        "keep its record, results.json, in <out_dir>/<experiment>/<overrides>; re-running resumes "
        "or skips it.",
        "usage": "convnn-train [-m] [--cfg job] [key=value ...]",
        "flags": (
            (
                "-m",
                "sweep every combination (a,b,c values; an experiment's rows); add "
                "hydra.sweeper.dry_run=true to list the jobs and run none",
            ),  # fmt: skip
            ("--cfg job", "print the composed config and run nothing"),
            ("-sc install=bash", "print the bash tab-completion script (eval it)"),
            ("--hydra-help", "every Hydra flag"),
        ),
        "examples": (
            "convnn-train experiment=quickstart",
            "convnn-train -m experiment=paper/table1 hydra.sweeper.dry_run=true",
            "convnn-train model=vgg11 layer=branching layer.ratio=0.25 data=cifar100 budget=smoke",
        ),
    },
    "convnn-profile": {
        "summary": "parameters and GFLOPs (fvcore multiply-adds and the paper's torch.profiler count) of "
        "the model convnn-train would build for the same arguments, at batch 1; reads no data, "
        "writes nothing; the last line printed is one JSON object.",
        "usage": "convnn-profile [--cfg job] [key=value ...]   (the keys of convnn-train; model, layer, data "
        "and budget choose what is built)",
        "flags": (
            ("--cfg job", "print the composed config and profile nothing"),
            ("-sc install=bash", "print the bash tab-completion script (eval it)"),
            ("--hydra-help", "every Hydra flag"),
        ),
        "examples": (
            "convnn-profile model=vgg11 layer=branching layer.ratio=0.5 data=cifar10",
            "convnn-profile model=vit_tiny layer=convnn_attention layer.sampling=random "
            "layer.num_candidates=32",
            "convnn-profile experiment=mini/table1",
        ),
    },
}


def key_rows() -> list[tuple[str, str]]:
    """``(key, text)`` for every field of the schema; a section lists its keys."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        text = KEY_TEXT[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            rows.append((f"{f.name}.*", f"{text} {', '.join(g.name for g in dataclasses.fields(default))}"))
        else:
            rows.append((f"{f.name}.*" if isinstance(default, dict) else f.name, text))
    return rows


def page(prog: str) -> str:
    """The ``--help`` page of ``prog`` (``convnn-train`` or ``convnn-profile``), ``$`` escaped for
    Hydra's ``string.Template`` but for ``$APP_CONFIG_GROUPS``."""
    spec = PAGES[prog]
    sections = [
        ("Config groups (group=option)", GROUPS),
        ("Keys (key=value; nested keys with dots, e.g. layer.k=9 optim.lr=3e-4)", key_rows()),
        ("Flags", spec["flags"]),
        ("Experiments (experiment=<name>)", experiments()),
        ("Examples", examples(spec["examples"])),
    ]
    text = help_page(prog, spec["summary"], spec["usage"], sections)
    return text.replace("$", "$$").replace("$$" + GROUPS[1:], GROUPS)


OmegaConf.register_new_resolver("convnn_help", page, replace=True)

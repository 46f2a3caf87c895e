"""Every paper experiment resolves to what the authors ran: one expected row per paper cell family.

Each sweep row of ``experiments/paper/<name>.yaml`` (a family of paper cells) is composed with Hydra as
the sweeper launches it (its last job, CIFAR-10, seed 0) and its resolved config compared with
the values below, written from the paper and the reference notes ("Semantics the paper's runs depend
on"), not from the experiment files. The swept keys must take exactly the listed values.
"""

from __future__ import annotations

import math
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from convnn.runs.sweep import expand_jobs, override_key

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

RECIPE = {  # paper Sec. 6 / 10-11: AdamW 1e-4, wd 0.01, clip 1.0, no schedule, 150 epochs, batch 256
    "optim.name": "adamw",
    "optim.lr": 1e-4,
    "optim.weight_decay": 0.01,
    "optim.grad_clip": 1.0,
    "scheduler.name": "none",
    "epochs": 150,
    "batch_size": 256,
    "data.augment": "none",
    "data.name": "cifar10",
}
VGG = {
    **RECIPE,
    "model.name": "vgg11",
    "model.classifier_init": "pytorch",  # the reference keeps nn.Linear's default init
    "model.dropout": 0.5,
    "model.hidden_features": 4096,
    "model.width_mult": 1.0,
    "layer.name": "branching",
    "layer.k": 9,
    "layer.kernel_size": 3,
    "layer.padding": 1,
    "layer.similarity": "cosine",
    "layer.projections": "identity",
    "layer.rho": "ones",
    "layer.self_first": True,
    "layer.aggregation": "standard",
    "layer.unit_init": False,
    "layer.bias": True,
    "layer.patch": 1,
    "layer.select_by": "features",
    "layer.aggregate_position": False,
    "layer.sampling": "all",
    "layer.fallback_to_all": False,
}
VIT = {
    **RECIPE,
    "model.name": "vit_tiny",
    "model.cls_init": "randn",  # the reference's cls token: randn, std 1
    "model.image_size": 224,
    "model.patch_size": 16,
    "model.dim": 192,
    "model.depth": 12,
    "model.mlp_dim": 768,
    "model.dropout": 0.1,
    "layer.heads": 1,
    "layer.dropout": 0.1,
}
CONVNN_ATTENTION = {  # all candidates: no forced self neighbour, dropout on the aggregated output
    **VIT,
    "layer.name": "convnn_attention",
    "layer.k": 9,
    "layer.similarity": "dot",
    "layer.projections": "linear",
    "layer.rho": "softmax",
    "layer.aggregation": "depthwise",
    "layer.unit_init": True,
    "layer.bias": False,
    "layer.sampling": "all",
    "layer.self_first": None,
    "layer.self_logit": None,
    "layer.dropout_on": "output",
}
SAMPLED_ATTENTION = {**CONVNN_ATTENTION, "layer.num_candidates": 32, "layer.self_logit": 1.0}
RESNET = {
    **RECIPE,
    "data.name": "imagenet",
    "model.name": "resnet50",
    "model.conv_bias": False,
    "layer.k": 9,
    "layer.bias": False,
    "layer.padding": 1,
    "layer.sampling": "all",
    "layer.fallback_to_all": False,
}
R_SQUARED = [r * r for r in range(4, 33, 2)]  # Figure 5: r = 4, 6, ..., 32 -> r^2 candidates / r x r grid
LAMBDAS = [i / 8 for i in range(9)]

# (experiment, sweep row) -> (values every job resolves to, {swept key: its values})
EXPECTED: dict[tuple[str, str], tuple[dict[str, Any], dict[str, list[Any]]]] = {
    ("table1", "lambda"): (VGG, {"layer.ratio": LAMBDAS, "layer.select_by": ["features", "both"]}),
    ("table2", "attention"): ({**VIT, "layer.name": "attention"}, {}),
    ("table2", "local"): (
        {**VIT, "layer.name": "local_attention", "layer.window": 128, "layer.dim_head": 64},
        {},
    ),
    ("table2", "kvt"): ({**VIT, "layer.name": "kvt_attention"}, {"layer.k": [9, 100]}),
    ("table2", "sparse"): ({**VIT, "layer.name": "sparse_attention", "layer.context": 49}, {}),
    ("table2", "convnn_all"): (CONVNN_ATTENTION, {}),
    ("table2", "convnn_sampled"): (SAMPLED_ATTENTION, {"layer.sampling": ["random", "spatial"]}),
    ("table3", "lambda"): (
        {**VGG, "layer.select_by": "both", "layer.aggregate_position": True},
        {"layer.ratio": LAMBDAS},
    ),
    ("table4", "conv2d"): ({**VGG, "layer.ratio": 0.0}, {}),
    ("table4", "convnn"): (VGG, {"layer.ratio": [0.5, 1.0], "layer.patch": [1, 2]}),
    ("table5", "attention"): ({**VIT, "layer.name": "attention"}, {}),
    ("table5", "convnn_d"): (CONVNN_ATTENTION, {}),
    ("table5", "convnn_ds_r"): (  # DS and R: PyTorch's default init (only D is unit-initialised)
        {**CONVNN_ATTENTION, "layer.unit_init": False},
        {"layer.aggregation": ["separable", "standard"]},
    ),
    ("fig4", "branching"): (
        {**VGG, "epochs": 100, "layer.ratio": 0.5},
        {"layer.k": list(range(1, 13)), "layer.kernel_size": [1, 2, 3]},
    ),
    ("fig4", "conv2d"): ({**VGG, "epochs": 100, "layer.ratio": 0.0}, {"layer.kernel_size": [1, 2, 3]}),
    ("fig5", "sampled"): (
        {**VGG, "layer.fallback_to_all": True},
        {
            "layer.ratio": [0.5, 1.0],
            "layer.sampling": ["random", "spatial"],
            "layer.num_candidates": R_SQUARED,
        },
    ),
    ("fig5", "all"): (VGG, {"layer.ratio": [0.5, 1.0]}),
    ("fig5", "conv2d"): ({**VGG, "layer.ratio": 0.0}, {}),
    ("fig7", "convnn_all"): (CONVNN_ATTENTION, {"layer.k": list(range(2, 13))}),
    ("fig7", "convnn_random"): (
        {**SAMPLED_ATTENTION, "layer.sampling": "random"},
        {"layer.k": list(range(2, 13))},
    ),
    ("fig7", "kvt"): ({**VIT, "layer.name": "kvt_attention"}, {"layer.k": [*range(2, 13), 100]}),
    ("fig7", "attention"): ({**VIT, "layer.name": "attention"}, {}),
    ("fig8", "sampled"): (
        {key: value for key, value in SAMPLED_ATTENTION.items() if key != "layer.num_candidates"},
        {"layer.sampling": ["random", "spatial"], "layer.num_candidates": list(range(16, 193, 16))},
    ),
    ("fig8", "all"): (CONVNN_ATTENTION, {}),
    ("fig8", "attention"): ({**VIT, "layer.name": "attention"}, {}),
    ("fig10", "lr"): (
        {key: value for key, value in VGG.items() if key != "optim.lr"},
        {"layer.ratio": [0.0, 0.5, 1.0], "optim.lr": [1e-3, 1e-4, 1e-5]},
    ),
    ("resnet50", "standard"): (
        {
            key: value
            for key, value in {**RESNET, "layer.name": "conv2d", "model.conv_bias": True}.items()
            if not key.startswith("layer.") or key == "layer.name"
        },
        {},
    ),
    ("resnet50", "convnn"): ({**RESNET, "layer.name": "convnn"}, {}),
    ("resnet50", "branching_all"): ({**RESNET, "layer.name": "branching", "layer.ratio": 0.5}, {}),
    ("resnet50", "branching_random"): (
        {
            **RESNET,
            "layer.name": "branching",
            "layer.ratio": 0.5,
            "layer.sampling": "random",
            "layer.num_candidates": 32,
        },
        {},
    ),
    ("resnet50", "branching_spatial"): (  # a 5 x 5 grid over the real pixels
        {
            **RESNET,
            "layer.name": "branching",
            "layer.ratio": 0.5,
            "layer.sampling": "spatial",
            "layer.num_candidates": 25,
        },
        {},
    ),
}


def _value(text: str) -> Any:
    """An override value as Hydra reads it: bool, int, float or string."""
    parsed = OmegaConf.create({"v": text}).v if text.lower() not in ("true", "false") else text == "true"
    for kind in (int, float):
        try:
            return kind(parsed)
        except (TypeError, ValueError):
            continue
    return parsed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def test_every_sweep_row_of_every_paper_experiment_has_an_expected_row() -> None:
    rows = {(path.stem, row) for path in sorted((CONFIGS.parent / "experiments" / "paper").glob("*.yaml"))
            for row in OmegaConf.load(path).hydra.sweeper.rows}  # fmt: skip
    assert rows == set(EXPECTED)


@pytest.fixture(scope="module")
def composer():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        yield lambda overrides: OmegaConf.to_container(
            compose(config_name="train", overrides=overrides), resolve=False
        )


@pytest.mark.parametrize(("name", "row"), sorted(EXPECTED), ids=lambda v: str(v))
def test_paper_cell_family_resolves_to_the_reference_setting(name: str, row: str, composer) -> None:
    fixed, swept = EXPECTED[(name, row)]
    cfg = OmegaConf.load(CONFIGS.parent / "experiments" / "paper" / f"{name}.yaml")
    params = {key: str(value) for key, value in cfg.hydra.sweeper.params.items()}
    assert params.get("seed") == "0,1,2"
    assert params.get("data", "imagenet") == ("imagenet" if name == "resnet50" else "cifar10,cifar100")
    jobs = expand_jobs(
        {row: cfg.hydra.sweeper.rows[row]}, ["data=cifar10", "seed=0"] if "data" in params else ["seed=0"]
    )
    varying = {}
    for job in jobs:
        for override in job:
            varying.setdefault(override_key(override), set()).add(_value(override.split("=", 1)[1]))
    varying = {key: values for key, values in varying.items() if len(values) > 1}
    assert {key: sorted(values) for key, values in varying.items()} == {
        k: sorted(v) for k, v in swept.items()
    }
    assert len(jobs) == reduce(lambda n, values: n * len(values), swept.values(), 1)
    resolved = OmegaConf.create(composer([f"experiment=paper/{name}", *jobs[-1]]))
    for key, want in fixed.items():
        got = OmegaConf.select(resolved, key)
        if key in swept:
            assert any(_same(got, value) for value in swept[key]), f"{name}/{row}: {key}={got!r}"
        else:
            assert _same(got, want), f"{name}/{row} {' '.join(jobs[-1])}: {key}={got!r}, expected {want!r}"

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from convnn import paths
from convnn.layers import available_layers, layer_entry
from convnn.train.app import CONFIG_DIR, preflight
from convnn.train.config import ConfigError, check_layer_options, validate_config

EXPERIMENTS = CONFIG_DIR.parent / "experiments"


@pytest.fixture(autouse=True)
def _default_runs_dir(monkeypatch):
    monkeypatch.delenv("CONVNN_RUNS_DIR", raising=False)


def compose_train(*overrides: str):
    """The composed ``convnn-train`` config (``name`` resolved as in a run) and its run directories."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    hydra_cfg = {
        "sweep_dir": str(cfg.hydra.sweep.dir),
        "run_dir": str(cfg.hydra.run.dir),
    }
    with open_dict(cfg):
        cfg.name = str(cfg.name)
        del cfg["hydra"]
    return cfg, hydra_cfg


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("name", available_layers())
def test_every_registered_layer_has_a_yaml_with_exactly_its_builder_options(name):
    path = CONFIG_DIR / "layer" / f"{name}.yaml"
    assert path.is_file(), f"configs/layer/{name}.yaml is missing"
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg["name"] == name
    assert sorted(k for k in cfg if k != "name") == sorted(layer_entry(name).option_names())
    check_layer_options(cfg)  # the yaml's values have the builder's types


def test_layer_yaml_defaults_are_the_paper_settings():
    load = lambda n: OmegaConf.load(CONFIG_DIR / "layer" / f"{n}.yaml")  # noqa: E731
    vgg = load("branching")
    assert (vgg.k, vgg.similarity, vgg.projections, vgg.rho, vgg.sampling, vgg.padding) == (
        9, "cosine", "identity", "ones", "all", 1,
    )  # fmt: skip
    vit = load("convnn_attention")
    assert (vit.k, vit.rho, vit.aggregation, vit.unit_init, vit.bias, vit.projections, vit.heads) == (
        9, "softmax", "depthwise", True, False, "linear", 1,
    )  # fmt: skip
    assert vit.dropout == 0.1


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("data", "trainer", "logger", "budget", "layer") for o in _group_options(g)],
)
def test_every_group_option_composes_and_validates(group, option):
    cfg, _ = compose_train(f"{group}={option}", "data.root=/somewhere")
    typed = validate_config(cfg)
    assert OmegaConf.select(cfg, group) is not None or group == "budget"
    assert typed.epochs >= 1


def test_defaults_are_the_papers_recipe():
    typed = validate_config(compose_train("data.root=/x")[0])
    assert (typed.optim.name, typed.optim.lr, typed.optim.weight_decay, typed.optim.grad_clip) == (
        "adamw", 1e-4, 0.01, 1.0,
    )  # fmt: skip
    assert (typed.epochs, typed.batch_size, typed.scheduler.name, typed.optim.label_smoothing) == (
        150,
        256,
        "none",
        0,
    )
    assert (typed.data.augment, typed.data.subset.train, typed.budget) == ("none", None, "full")
    assert typed.data.mean == [0.4914, 0.4822, 0.4465] and typed.data.std == [0.2470, 0.2435, 0.2616]
    c100 = validate_config(compose_train("data=cifar100")[0]).data
    assert c100.mean == [0.5071, 0.4867, 0.4408] and c100.std == [0.2675, 0.2565, 0.2761]


def test_smoke_budget_is_small():
    typed = validate_config(compose_train("budget=smoke")[0])
    assert (typed.budget, typed.epochs, typed.batch_size) == ("smoke", 2, 32)
    assert (typed.data.subset.train, typed.data.subset.test) == (512, 256)


def test_early_budget_is_the_paper_recipe_cut_short():
    """budget=early differs from the paper's (budget=full) only in its label and epochs."""
    args = ("experiment=paper/table1", "layer.ratio=0.5")
    full = OmegaConf.to_container(compose_train(*args)[0], resolve=True)
    early = OmegaConf.to_container(compose_train(*args, "budget=early")[0], resolve=True)
    assert (early["budget"], early["epochs"], full["epochs"]) == ("early", 2, 150)
    assert {**early, "budget": "full", "epochs": 150} == full
    assert compose_train(*args, "budget=early", "epochs=5")[0].epochs == 5


def test_experiment_group_is_the_top_level_experiments_folder():
    assert not (CONFIG_DIR / "experiment").exists()  # reached through a search path, not a symlink
    assert EXPERIMENTS == paths.EXPERIMENTS_DIR and (EXPERIMENTS / "paper" / "table1.yaml").is_file()
    cfg, hydra_cfg = compose_train("experiment=quickstart")
    assert cfg.name == "quickstart" and hydra_cfg["sweep_dir"] == "runs/quickstart"
    assert hydra_cfg["run_dir"].startswith("runs/quickstart/resnet18-branching-cifar10,")
    assert hydra_cfg["run_dir"].endswith(",seed=0")
    assert (cfg.model.name, cfg.layer.name, cfg.layer.ratio, cfg.data.name, cfg.epochs) == (
        "resnet18", "branching", 0.5, "cifar10", 2,
    )  # fmt: skip
    validate_config(cfg)


@pytest.mark.parametrize(
    "path", sorted(EXPERIMENTS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_nested_experiments_compose_and_name_their_run_directory(path):
    choice = f"{path.parent.name}/{path.stem}"
    cfg, hydra_cfg = compose_train(f"experiment={choice}")
    assert cfg.name == choice
    assert hydra_cfg["sweep_dir"] == f"runs/{choice}"


def test_the_run_directory_depends_on_identity_and_seed_only():
    """Overrides that leave the identity and seed alone (an explicit default seed, bookkeeping keys,
    a key given twice, ``0.5`` written ``0.50``) name the same directory; any real change another."""
    base = ["layer=branching", "layer.ratio=0.5"]
    run_dir = compose_train(*base)[1]["run_dir"]
    for same in (
        ["seed=0"],
        ["trainer.deterministic=true"],
        ["data.format=imagefolder"],
        ["layer.ratio=0.25", "layer.ratio=0.50"],
        ["epochs=2", "epochs=150"],
        ["data.root=/elsewhere", "resume=false", "logger=wandb", "trainer.progress_bar=none", "budget=full"],
    ):
        assert compose_train(*base, *same)[1]["run_dir"] == run_dir, same
    others = [["seed=1"], ["layer.ratio=0.25"], ["epochs=3"], ["optim.lr=1e-3"], ["budget=smoke"]]
    named = {compose_train(*base, *other)[1]["run_dir"] for other in others}
    assert len(named) == len(others) and run_dir not in named
    assert compose_train(*base, "experiment=paper/table1")[1]["run_dir"].startswith("runs/paper/table1/")


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=-1", "optim.lr=-1.0; allowed: > 0"),
        ("trainer.precision=16", "trainer.precision='16'; allowed: one of ['32', 'bf16']"),
        ("data.subset.train=0", "data.subset.train=0; allowed: >= 1 or null"),
        ("optim.label_smoothing=1.0", "optim.label_smoothing=1.0; allowed: [0, 1)"),
        ("scheduler.name=linear", "scheduler.name='linear'; allowed: one of ['none', 'cosine', 'step']"),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_allowed(override, message):
    cfg, _ = compose_train(override)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.num_workers=abc", "data.num_workers='abc'; Value 'abc' of type 'str' could not be converted"),
        ("epochs=1.5", "epochs='1.5'; Value '1.5' of type 'float' could not be converted to Integer"),
        ("optim.lr=fast", "optim.lr='fast'; Value 'fast' of type 'str' could not be converted to Float"),
    ],
)
def test_hydra_checks_types_at_composition_against_the_schema(override, message, capsys):
    with pytest.raises(HydraException):
        compose_train(override)
    with pytest.raises(SystemExit):
        preflight([override])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_train_yaml_repeats_no_schema_default():
    text = (CONFIG_DIR / "train.yaml").read_text()
    assert text.index("train_schema") < text.index("_self_")
    body = [line for line in text.splitlines() if line and not line.startswith(("#", " ", "-", "hydra:"))]
    assert sorted(line.split(":")[0] for line in body) == ["defaults", "name", "out_dir"]


def test_unknown_key_in_a_validated_node_lists_the_allowed_keys():
    cfg, _ = compose_train()
    plain = OmegaConf.to_container(cfg)  # a config from elsewhere (the schema refuses it at composition)
    plain["optim"]["lrate"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrate'; allowed keys: \['name', 'lr'"):
        validate_config(plain)


@pytest.mark.parametrize(
    "layer,message",
    [
        ({"name": "convnn", "k": "nine"}, "layer.k='nine'; allowed: int"),
        (
            {"name": "conv2d", "kernal": 3},
            "layer.kernal=3; allowed: layer 'conv2d' options ['kernel_size', 'bias']",
        ),
        ({"name": "convnn", "proj_dim": 1.5}, "layer.proj_dim=1.5; allowed: int | None"),
        ({"name": "branching", "k": "nine"}, "layer.k='nine'; allowed: int"),  # a ConvNN option
        ({"name": "branching", "sampling": 3}, "layer.sampling=3; allowed: str"),
    ],
)
def test_layer_options_are_checked_against_the_builder_signature(layer, message):
    with pytest.raises(ConfigError) as e:
        check_layer_options(layer)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["layer.kernal=3"],
            "unknown key 'layer.kernal' (=3); allowed keys at 'layer': ['name', 'kernel_size', 'bias']",
        ),
        (["foo=1"], "unknown key 'foo' (=1); allowed keys at the top level: ['name', 'seed'"),
        (["layer=branchy"], "layer='branchy'; allowed: ['attention', 'branching'"),
    ],
)
def test_composition_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        preflight(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_preflight_leaves_good_overrides_sweeps_and_flags_to_hydra():
    preflight(["layer=branching", "layer.ratio=0.25"])
    preflight(["layer.kernal=1,2"])
    preflight(["--cfg", "job", "foo=1"])

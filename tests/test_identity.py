from convnn.runs.identity import effective_budget, identity_diff, identity_key, run_identity

BASE = {
    "name": "paper/table1",
    "seed": 0,
    "resume": True,
    "overwrite": False,
    "out_dir": "runs",
    "budget": "smoke",
    "epochs": 2,
    "batch_size": 32,
    "eval_batch_size": None,
    "model": {"name": "vgg11"},
    "layer": {"name": "branching", "ratio": 0.5},
    "data": {
        "name": "cifar10",
        "root": "/a",
        "num_workers": 2,
        "subset": {"train": 512, "test": 256},
        "augment": "none",
    },
    "optim": {"lr": 1e-4, "weight_decay": 0.01},
    "scheduler": {"name": "none"},
    "trainer": {"precision": "32", "devices": 1, "progress_bar": "rich", "accelerator": "cpu"},
    "logger": {"name": "csv"},
    "checkpoint": {"keep": False},
}


def _with(path: str, value):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node[part] = dict(node[part])
        node = node[part]
    node[leaf] = value
    return out


def test_seed_and_bookkeeping_do_not_change_the_identity():
    for path, value in [
        ("seed", 3),
        ("name", "other"),
        ("budget", "full"),  # a label: the values below are what counts
        ("out_dir", "/elsewhere"),
        ("resume", False),
        ("data.root", "/b"),
        ("data.num_workers", 8),
        ("trainer.devices", 4),
        ("trainer.progress_bar", "none"),
        ("logger.name", "wandb"),
        ("checkpoint.keep", True),
    ]:
        assert identity_key(_with(path, value)) == identity_key(BASE), path
    assert BASE["seed"] == 0 and "seed" not in run_identity(BASE)  # the input is not modified


def test_everything_that_changes_the_result_changes_the_identity():
    for path, value in [
        ("epochs", 5),
        ("batch_size", 64),
        ("data.subset", {"train": 1024, "test": 256}),
        ("data.augment", "crop_flip"),
        ("optim.weight_decay", 0.0),
        ("optim.lr", 1e-3),
        ("scheduler.name", "cosine"),
        ("trainer.precision", "bf16"),
        ("layer.ratio", 0.25),
        ("model.name", "vgg13"),
        ("data.name", "cifar100"),
    ]:
        changed = _with(path, value)
        assert identity_key(changed) != identity_key(BASE), path
        assert identity_diff(run_identity(changed), run_identity(BASE))[0].startswith(path), path


def test_effective_budget_is_the_values_not_the_label():
    assert effective_budget(_with("epochs", 5)) == {
        "epochs": 5,
        "batch_size": 32,
        "eval_batch_size": None,
        "data.subset": {"train": 512, "test": 256},
        "data.train_size": None,
        "data.test_size": None,
    }

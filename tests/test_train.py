"""End-to-end ``convnn-train`` runs on CPU (in-process through the real Hydra entry point)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convnn.runs import rundir
from convnn.runs.records import EPOCH_FIELDS, RECORD_FIELDS, read_record, write_record
from convnn.train import app as train
from convnn.train.config import LoggerConfig, OptimConfig, SchedulerConfig
from convnn.train.loggers import build_logger, wandb_mode
from convnn.train.module import ImageClassifier

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"  # ../shared
CIFAR10 = Path(os.environ.get("CONVNN_CIFAR10", SHARED_CIFAR10))
QUIET = ["trainer.progress_bar=none", "logger=none"]
TINY_DATA = ["data=synthetic", "data.train_size=64", "data.test_size=32", "batch_size=32"]
TINY_VGG = ["model=vgg11", "model.width_mult=0.125", "model.hidden_features=32"]
BACKBONES = {
    "vgg11": [*TINY_VGG, "layer=branching", "layer.sampling=random", "layer.num_candidates=16"],
    "vit_tiny": [
        "model=vit_tiny",
        "model.image_size=32",
        "model.patch_size=8",
        "model.dim=32",
        "model.depth=1",
        "model.mlp_dim=64",
        "layer=convnn_attention",
        "layer.sampling=random",
        "layer.num_candidates=12",
        "trainer.precision=bf16",
    ],
    "resnet18": ["model=resnet18", "layer=conv2d"],
}


def convnn_train(out_dir: Path, *overrides: str, monkeypatch) -> Path:
    """Run ``convnn-train out_dir=<out_dir> <overrides>`` in-process; returns the run directory."""
    monkeypatch.setattr(sys, "argv", ["convnn-train", f"out_dir={out_dir}", *overrides])
    train.main()
    runs = [p.parent for p in out_dir.rglob("results.json")]
    return max(runs, key=lambda p: p.stat().st_mtime)


def curves(record: dict) -> list[list[float]]:
    """Every epoch's losses and accuracies (not its timings), for exact comparison of two runs."""
    keys = [k for k in EPOCH_FIELDS if k not in ("epoch_time_s", "images_per_s")]
    return [[row[k] for k in keys] for row in record["epochs"]]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_synthetic_data_trains_each_backbone_and_writes_the_record(backbone, tmp_path, monkeypatch, capsys):
    overrides = [*TINY_DATA, *BACKBONES[backbone], "epochs=1", "trainer.progress_bar=none"]
    run_dir = convnn_train(tmp_path, *overrides, monkeypatch=monkeypatch)
    record = read_record(run_dir)
    assert run_dir == tmp_path / "default" / rundir.run_name(record["config"])
    assert set(RECORD_FIELDS) <= set(record)
    assert (record["status"], record["error"], record["experiment"], record["budget"]) == (
        "finished", None, "default", "full",
    )  # fmt: skip
    assert record["overrides"] == [f"out_dir={tmp_path}", *overrides]
    assert record["config"]["model"]["name"] == backbone and record["config"]["epochs"] == 1
    [row] = record["epochs"]
    assert tuple(row) == EPOCH_FIELDS and row["epoch"] == 1
    for key in ("train_acc1", "train_acc5", "test_acc1", "test_acc5"):
        assert 0 <= row[key] <= 100
    assert row["test_acc1"] <= row["test_acc5"] and math.isfinite(row["test_loss"])
    assert row["epoch_time_s"] > 0 and row["images_per_s"] == pytest.approx(64 / row["epoch_time_s"])
    final_keys = ("test_loss", "test_acc1", "test_acc5", "test_loss_batchmean", "test_acc1_batchmean")
    assert record["final"] == {k: row[k] for k in (*final_keys, "test_images")} and row["test_images"] == 32
    # one test batch of 32: the per-batch mean is the per-image mean
    assert row["test_acc1_batchmean"] == pytest.approx(row["test_acc1"])
    assert row["test_loss_batchmean"] == pytest.approx(row["test_loss"])
    assert record["best"]["epoch"] == 1
    assert record["params"] == record["trainable_params"] > 0 and record["gflops"] > 0
    assert record["wall_time_s"] > 0 and record["finished_at"] >= record["started_at"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "test/acc1" in (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "convnn-train summary" in capsys.readouterr().out


def test_sweep_jobs_and_single_runs_share_run_directories(tmp_path, monkeypatch, capsys):
    overrides = [*TINY_DATA, *TINY_VGG, "layer=conv2d", "epochs=1", *QUIET]
    monkeypatch.setattr(sys, "argv", ["convnn-train", "-m", f"out_dir={tmp_path}", *overrides, "seed=0,1"])
    train.main()
    dirs = sorted(p.parent for p in tmp_path.rglob("results.json"))
    assert [read_record(d)["seed"] for d in dirs] == [0, 1]
    assert dirs == [tmp_path / "default" / rundir.run_name(read_record(d)["config"]) for d in dirs]
    capsys.readouterr()
    run_dir = convnn_train(tmp_path, *overrides, "seed=1", "resume=true", monkeypatch=monkeypatch)
    assert "already finished; nothing to do" in capsys.readouterr().out

    record = read_record(run_dir)  # a record made with another budget is another run: kept, refused
    write_record(run_dir / "results.json", {**record, "config": {**record["config"], "batch_size": 7}})
    with pytest.raises(SystemExit) as e:
        convnn_train(tmp_path, *overrides, "seed=1", monkeypatch=monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds a different run (its record differs in batch_size); overwrite=true" in err
    assert read_record(run_dir)["config"]["batch_size"] == 7
    convnn_train(tmp_path, *overrides, "seed=1", "overwrite=true", monkeypatch=monkeypatch)
    assert read_record(run_dir)["config"]["batch_size"] == record["config"]["batch_size"]


@pytest.mark.slow
def test_a_learnable_problem_is_learned(tmp_path, monkeypatch):
    model = [
        "model=vgg11",
        "model.width_mult=0.125",
        "model.hidden_features=64",
        "model.dropout=0",
        "layer=conv2d",
    ]
    data = ["data=synthetic", "data.train_size=512", "data.test_size=128", "batch_size=32"]
    run_dir = convnn_train(
        tmp_path, *model, *data, "epochs=3", "optim.lr=1e-3", *QUIET, monkeypatch=monkeypatch
    )
    epochs = read_record(run_dir)["epochs"]
    assert epochs[-1]["test_acc1"] > 30 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]  # chance: 10 %


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    overrides = [*TINY_DATA, *BACKBONES["vgg11"], "data.augment=crop_flip", "epochs=2", *QUIET]
    straight = read_record(convnn_train(tmp_path / "a", *overrides, monkeypatch=monkeypatch))

    real_step = ImageClassifier.training_step

    def dies_in_epoch_two(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "training_step", dies_in_epoch_two)
    with pytest.raises(SystemExit):  # Hydra reports the error and exits 1
        convnn_train(tmp_path / "b", *overrides, monkeypatch=monkeypatch)
    killed = read_record(next((tmp_path / "b").rglob("results.json")))
    assert (killed["status"], killed["error"], len(killed["epochs"])) == ("failed", "RuntimeError: killed", 1)

    monkeypatch.setattr(ImageClassifier, "training_step", real_step)
    resumed_dir = convnn_train(tmp_path / "b", *overrides, "resume=true", monkeypatch=monkeypatch)
    resumed = read_record(resumed_dir)
    assert resumed["status"] == "finished" and resumed["run_dir"] == killed["run_dir"]
    assert curves(resumed) == curves(straight)
    assert resumed["final"] == straight["final"] and resumed["started_at"] == killed["started_at"]

    before = (resumed_dir / "results.json").read_text()
    convnn_train(tmp_path / "b", *overrides, "resume=true", monkeypatch=monkeypatch)
    assert (resumed_dir / "results.json").read_text() == before  # finished: nothing re-run


@pytest.mark.slow
def test_resume_after_sigkill_of_the_process_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    data = ["data=synthetic", "data.train_size=512", "data.test_size=64", "batch_size=32"]
    overrides = [*data, *BACKBONES["vgg11"], "epochs=2", *QUIET]
    straight = read_record(convnn_train(tmp_path / "a", *overrides, monkeypatch=monkeypatch))
    cmd = [sys.executable, "-m", "convnn.train.app", f"out_dir={tmp_path / 'b'}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "b").rglob("results.json"))
        if found and len(read_record(found[0])["epochs"]) == 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed = read_record(found[0])
    assert (killed["status"], len(killed["epochs"])) == ("running", 1)
    resumed = read_record(convnn_train(tmp_path / "b", *overrides, "resume=true", monkeypatch=monkeypatch))
    assert resumed["status"] == "finished" and curves(resumed) == curves(straight)


@pytest.mark.parametrize(
    "override,message",
    [
        ("layer.ratio=1.5", "layer=branching: branching ratio must lie in [0, 1], got 1.5"),
        ("layer.sampling=rnd", "sampling must be one of ['all', 'random', 'spatial'], got 'rnd'"),
        ("layer.kernal=3", "unknown key 'layer.kernal' (=3); allowed keys at 'layer': ['name', 'ratio'"),
        ("optim.lr=0", "invalid config: optim.lr=0.0; allowed: > 0"),
    ],
)
def test_bad_overrides_stop_with_one_line_before_any_data_is_read(
    override, message, tmp_path, monkeypatch, capsys
):
    missing_data = tmp_path / "no-data"
    with pytest.raises(SystemExit) as e:
        convnn_train(
            tmp_path, "layer=branching", f"data.root={missing_data}", override, monkeypatch=monkeypatch
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("results.json")) and not missing_data.exists()


def test_missing_data_stops_with_one_line_naming_data_root(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-data"
    with pytest.raises(SystemExit):
        convnn_train(
            tmp_path,
            *TINY_VGG,
            f"data.root={missing}",
            "data.download=false",
            *QUIET,
            monkeypatch=monkeypatch,
        )
    err = capsys.readouterr().err
    assert f"cifar10 not found under data.root='{missing}'" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # no run folder, not even an empty one


def test_wandb_project_group_and_id_come_from_the_experiment_and_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = LoggerConfig(name="wandb", project="convnn-test")
    a = build_logger(cfg, tmp_path / "r1", "paper/table1", "layer=branching", {"seed": 0})
    b = build_logger(cfg, tmp_path / "r1", "paper/table1", "layer=branching", {"seed": 0})
    init = a._wandb_init
    assert (init["project"], init["group"], init["name"], init["mode"]) == (
        "convnn-test", "paper-table1", "layer=branching", "disabled",
    )  # fmt: skip
    assert (
        init["id"]
        == b._wandb_init["id"]
        != build_logger(cfg, tmp_path / "r2", "e", "n", {})._wandb_init["id"]
    )
    assert wandb_mode("offline") == "disabled"  # $WANDB_MODE wins


def test_wandb_mode_disabled_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [
        *TINY_DATA,
        *TINY_VGG,
        "layer=conv2d",
        "epochs=1",
        "logger=wandb",
        "trainer.progress_bar=none",
    ]
    run_dir = convnn_train(tmp_path, *overrides, monkeypatch=monkeypatch)
    assert read_record(run_dir)["status"] == "finished" and not list(run_dir.rglob("offline-run-*"))


@pytest.mark.skipif(not (CIFAR10 / "train").is_dir(), reason=f"offline CIFAR-10 copy not found at {CIFAR10}")
def test_real_cifar10_is_learned_well_above_chance(tmp_path, monkeypatch):
    vit = ["model=vit_tiny", "model.image_size=32", "model.patch_size=4", "model.dim=64", "model.depth=2"]
    vit += ["model.mlp_dim=128", "model.dropout=0", "layer=attention", "layer.dropout=0"]
    data = ["data=cifar10", f"data.root={CIFAR10}", "data.subset.train=2048", "data.subset.test=500"]
    run = ["data.num_workers=0", "batch_size=16", "epochs=1", "optim.lr=1e-3", "checkpoint.enabled=false"]
    record = read_record(convnn_train(tmp_path, *vit, *data, *run, *QUIET, monkeypatch=monkeypatch))
    assert record["final"]["test_acc1"] > 17, record["epochs"]  # chance 10 %; 1 s.e. is 1.3 points


def test_learning_rate_schedules():
    from convnn.train.config import SchedulerConfig
    from convnn.train.module import lr_factor

    none = SchedulerConfig()
    assert [lr_factor(e, 10, none, 1e-3) for e in (0, 9)] == [1.0, 1.0]
    warm_cos = SchedulerConfig(name="cosine", warmup_epochs=1, min_lr=1e-4)
    factors = [lr_factor(e, 11, warm_cos, 1e-3) for e in range(11)]
    assert factors[0] == 0.5 and factors[1] == 1.0  # warm-up, then the cosine starts at the top
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5) and factors[10] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))
    )
    step = SchedulerConfig(name="step", step_size=3, gamma=0.5)
    assert [lr_factor(e, 10, step, 1.0) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]


def test_optimiser_is_the_papers_adamw_without_a_scheduler_by_default():
    import torch

    from convnn.train.config import OptimConfig, SchedulerConfig

    module = ImageClassifier(torch.nn.Linear(4, 3), 3, 150, OptimConfig(), SchedulerConfig())
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-4, 0.01)
    cosine = ImageClassifier(torch.nn.Linear(4, 3), 3, 150, OptimConfig(), SchedulerConfig(name="cosine"))
    assert cosine.configure_optimizers()["lr_scheduler"]["interval"] == "epoch"


def test_test_metrics_per_image_and_per_batch_mean():
    """Two test batches of 4 and 1 images: the per-batch mean weighs the single image as much as the 4."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3)).double()
    module = ImageClassifier(model, 3, 1, OptimConfig(), SchedulerConfig())
    torch.manual_seed(0)
    batches = [(torch.randn(n, 3, 1, 1, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (4, 1)]
    losses, hits = [], []
    for i, batch in enumerate(batches):
        module.validation_step(batch, i)
        logits = model(batch[0])
        losses.append(F.cross_entropy(logits, batch[1], reduction="none"))
        hits.append((logits.argmax(-1) == batch[1]).double())
    out = module._compute("test")
    # the metric states are float32: compare at 1e-6
    assert out["test_loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-6)
    assert out["test_acc1"] == pytest.approx(100 * torch.cat(hits).mean().item())
    batch_losses = [loss.mean().item() for loss in losses]
    assert out["test_loss_batchmean"] == pytest.approx(sum(batch_losses) / 2, rel=1e-6)
    assert out["test_acc1_batchmean"] == pytest.approx(100 * (hits[0].mean() + hits[1].mean()).item() / 2)
    assert out["test_loss_batchmean"] != pytest.approx(out["test_loss"])

"""The device a run trains on: ``trainer=auto`` (the default) picks the GPU when one is visible, else the
CPU; the choice with faked device counts, and a real default run on this CPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from convnn.runs.records import read_record
from convnn.train.config import ConfigError, TrainerConfig
from convnn.train.device import choose_accelerator, describe_device, resolve_accelerator
from tests.test_train import QUIET, TINY_DATA, TINY_VGG, convnn_train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    ("requested", "devices", "visible", "chosen"),
    [
        ("auto", 1, 0, "cpu"),
        ("auto", 2, 0, "cpu"),  # CPU processes (DDP on gloo)
        ("auto", 1, 1, "gpu"),
        ("auto", 4, 8, "gpu"),
        ("cpu", 1, 8, "cpu"),
        ("gpu", 1, 1, "gpu"),
        ("gpu", 8, 8, "gpu"),
    ],
)
def test_auto_is_the_gpu_when_one_is_visible(requested: str, devices: int, visible: int, chosen: str) -> None:
    assert choose_accelerator(requested, devices, visible) == chosen


@pytest.mark.parametrize(
    ("requested", "devices", "visible", "message"),
    [
        ("gpu", 1, 0, "trainer.accelerator='gpu' but this process sees no CUDA device"),
        ("gpu", 4, 2, "trainer.devices=4 but this process sees 2 CUDA devices; allowed: 1 to 2"),
        ("auto", 2, 1, "trainer.devices=2 but this process sees 1 CUDA device; allowed: 1 to 1"),
    ],
)
def test_asking_for_more_gpus_than_visible_is_one_line(requested, devices, visible, message) -> None:
    with pytest.raises(ConfigError) as error:
        choose_accelerator(requested, devices, visible)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_choice_reads_the_visible_device_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """With two GPUs faked, ``auto`` and ``gpu`` choose the GPU and the record names it; ``cpu`` stays."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA A100-SXM4-80GB")
    for requested in ("auto", "gpu"):
        trainer = TrainerConfig(accelerator=requested, devices=2)
        trainer.accelerator = resolve_accelerator(trainer)
        assert trainer.accelerator == "gpu"
        assert describe_device(trainer) == "gpu: 2x NVIDIA A100-SXM4-80GB"
    assert resolve_accelerator(TrainerConfig(accelerator="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_accelerator(TrainerConfig(accelerator="auto")) == "cpu"


def test_every_trainer_option_composes_and_auto_is_the_default() -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        default = compose("train")
        paper = compose("train", overrides=["experiment=paper/table1"])
        chosen = {
            name: compose("train", overrides=[f"trainer={name}"]).trainer for name in ("cpu", "gpu", "ddp")
        }
    assert default.trainer.accelerator == paper.trainer.accelerator == "auto"
    assert {name: t.accelerator for name, t in chosen.items()} == {"cpu": "cpu", "gpu": "gpu", "ddp": "gpu"}
    assert chosen["ddp"].strategy == "ddp"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU branch: this machine has a GPU")
def test_a_default_run_on_a_machine_without_gpu_trains_on_the_cpu_and_says_so(tmp_path, monkeypatch, capsys):
    run_dir = convnn_train(
        tmp_path, *TINY_DATA, *TINY_VGG, "layer=conv2d", "epochs=1", *QUIET, monkeypatch=monkeypatch
    )
    record = read_record(run_dir)
    assert record["status"] == "finished"
    assert record["config"]["trainer"]["accelerator"] == "auto"  # what was asked; device: what was used
    assert record["device"].startswith("cpu: ")
    assert f"convnn-train: training on {record['device']}" in capsys.readouterr().out.splitlines()


def test_trainer_gpu_without_a_gpu_stops_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as stop:
        convnn_train(tmp_path, *TINY_DATA, *TINY_VGG, "trainer=gpu", *QUIET, monkeypatch=monkeypatch)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "convnn-train: error: invalid config: trainer.accelerator='gpu' but this process sees no CUDA "
        "device; trainer=auto trains on the CPU then"
    ]
    assert not list(tmp_path.rglob("results.json"))

"""Which device a run trains on: ``trainer.accelerator`` (``auto`` by default) against the GPUs the
process can see, and the device's name for the start-up line and the run record."""

from __future__ import annotations

import platform

from convnn.train.config import ConfigError, TrainerConfig


def choose_accelerator(requested: str, devices: int, cuda_devices: int) -> str:
    """``"gpu"`` or ``"cpu"`` for ``trainer.accelerator=requested`` with ``trainer.devices=devices``
    per node on a machine whose process sees ``cuda_devices`` CUDA devices: ``auto`` is the GPU when
    one is visible, else the CPU. Asking for more GPUs than are visible (``gpu`` without any, or
    ``devices`` above the count) raises :class:`ConfigError` with one line."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto" and cuda_devices == 0:
        return "cpu"
    if cuda_devices == 0:
        raise ConfigError(
            f"invalid config: trainer.accelerator={requested!r} but this process sees no CUDA device; "
            "trainer=auto trains on the CPU then"
        )
    if devices > cuda_devices:
        raise ConfigError(
            f"invalid config: trainer.devices={devices} but this process sees {cuda_devices} CUDA "
            f"device{'s' * (cuda_devices != 1)}; allowed: 1 to {cuda_devices}"
        )
    return "gpu"


def resolve_accelerator(trainer: TrainerConfig) -> str:
    """:func:`choose_accelerator` for ``trainer`` on this machine (``torch.cuda.device_count()``)."""
    import torch

    return choose_accelerator(trainer.accelerator, trainer.devices, torch.cuda.device_count())


def describe_device(trainer: TrainerConfig) -> str:
    """The device a resolved ``trainer`` (accelerator ``gpu`` or ``cpu``) trains on, for the start-up
    line and the record: ``"gpu: 1x NVIDIA H100 80GB HBM3"`` or ``"cpu: x86_64, 2 threads"``."""
    import torch

    if trainer.accelerator == "gpu":
        return f"gpu: {trainer.devices * trainer.num_nodes}x {torch.cuda.get_device_name(0)}"
    processes = trainer.devices * trainer.num_nodes
    ranks = f"{processes} processes x " if processes > 1 else ""
    return f"cpu: {platform.processor() or platform.machine()}, {ranks}{torch.get_num_threads()} threads"

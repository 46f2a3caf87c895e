"""GPU training: deterministic pooling, device-built candidates, sync-free metrics, the selection's
float32 precision, chunk sizing, the start-up check's RNG fork, the data feed and what the record
says. Tested on the CPU where it can be; the tests marked ``cuda`` (``make gpu-check``) need a GPU."""

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms.v2 import functional as TF

from convnn import knn
from convnn.knn import CandidateSampler, knn_select, spatial_candidates
from convnn.knn.candidates import linspace_trunc
from convnn.knn.precision import RECORDED_BACKENDS, SELECTION_BACKENDS, _backend, full_fp32, matmul_precisions
from convnn.models import build_from_config
from convnn.models.accounting import fvcore_macs
from convnn.models.vgg import AvgPool7
from convnn.runs.records import read_record
from convnn.train import app as train
from convnn.train import gpu
from convnn.train.config import DataConfig, OptimConfig, SchedulerConfig, TrainerConfig, validate_config
from convnn.train.data import DataFeed, DeviceTransform, ImageDataModule, data_feed, resize_like_cpu
from convnn.train.distributed import Start
from convnn.train.module import ImageClassifier
from tests.test_configs import compose_train

DATA_ROOT = Path(os.environ.get("CONVNN_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))
CIFAR10 = DATA_ROOT / "cifar10"  # the offline ImageFolder copy, when there is one
TINY_VGG = {"name": "vgg11", "width_mult": 0.125, "hidden_features": 16}
# operations that make a GPU wait for the host or the host for the GPU: reading a value, and ops whose
# output size depends on the data
SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


class OpLog(TorchDispatchMode):
    """Every aten op run in the block, with the tensors it took and made."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, tensors))
        return out

    def count(self, names: set[str]) -> collections.Counter:
        return collections.Counter(name for name, _ in self.ops if name in names)


@pytest.fixture
def restore_precision():
    """Put the float32 precision settings back as they were (legacy API, then each backend)."""
    legacy = torch.get_float32_matmul_precision()
    saved = {path: _backend(path).fp32_precision for path in RECORDED_BACKENDS}
    yield
    torch.set_float32_matmul_precision(legacy)
    for path, value in saved.items():
        _backend(path).fp32_precision = value


def tiny_cfg(layer: dict | None = None, size: int = 32) -> dict:
    data = {"name": "synthetic", "image_size": size, "in_channels": 3, "num_classes": 10}
    return {"model": TINY_VGG, "layer": layer or {"name": "conv2d"}, "data": data}


# -- VGG's 7x7 average pool ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 32, 1, 1), (2, 8, 7, 7), (2, 8, 14, 14), (2, 4, 28, 21), (2, 4, 3, 5)])
def test_vgg_pool_equals_the_adaptive_pool_forward_and_backward(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad = torch.randn(shape[0], shape[1], 7, 7, generator=torch.Generator().manual_seed(1))
    pooled, ref = AvgPool7()(x), nn.AdaptiveAvgPool2d((7, 7))(x)
    assert torch.equal(pooled, ref)
    assert torch.equal(*(torch.autograd.grad(out, x, grad)[0] for out in (pooled, ref)))


def test_vgg_with_its_pool_equals_vgg_with_the_adaptive_pool():
    # CIFAR's 1x1 map: same logits, same gradient of every parameter, same parameters and fvcore count
    torch.manual_seed(0)
    model, _ = build_from_config(tiny_cfg())
    ref = build_from_config(tiny_cfg())[0]
    ref.load_state_dict(model.state_dict())
    ref.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    x = torch.randn(4, 3, 32, 32)
    outs = [m.eval()(x) for m in (model, ref)]
    grads = [
        torch.autograd.grad(out.square().sum(), list(m.parameters()))
        for out, m in zip(outs, (model, ref), strict=True)
    ]
    assert torch.equal(*outs) and all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert fvcore_macs(model, x[:1]) == fvcore_macs(ref, x[:1])


# -- spatial candidates ---------------------------------------------------------------------------------


def test_spatial_candidates_equal_the_cpu_linspace_construction():
    for end in range(150):
        for steps in range(1, end + 2):
            want = torch.linspace(0, end, steps, dtype=torch.float64).long()
            assert torch.equal(linspace_trunc(end, steps), want), (end, steps)
    # the paper's sequence (ViT-Tiny, r = 32) and grids on VGG's padded CIFAR maps
    assert spatial_candidates(197, 32)[:6].tolist() == [0, 6, 12, 18, 25, 31]
    for side in (32, 16, 8, 4, 2):
        for g in range(1, side + 1):
            rows = 1 + torch.linspace(0, side - 1, g, dtype=torch.float64).long()
            want = (rows[:, None] * (side + 2) + rows[None, :]).flatten()
            assert torch.equal(spatial_candidates((side + 2) ** 2, g * g, (side + 2, side + 2), 1), want)


@pytest.mark.parametrize("grid", [None, (9, 9)])
def test_spatial_candidates_are_built_on_the_device_without_a_host_tensor(grid):
    # built for the meta device: a host tensor, made or copied, would show as a CPU input or output
    sampler = CandidateSampler("spatial", 16)
    with OpLog() as log:
        cand = sampler.candidates(81, grid=grid, device=torch.device("meta"), padding=1 if grid else 0)
    assert cand.device.type == "meta" and cand.shape == (16,)  # 16 tokens, or a 4x4 grid
    assert log.ops and all(t.device.type == "meta" for _, tensors in log.ops for t in tensors)
    with OpLog() as again:  # cached per shape and device
        assert (
            sampler.candidates(81, grid=grid, device=torch.device("meta"), padding=1 if grid else 0) is cand
        )
    assert not again.ops


# -- metrics --------------------------------------------------------------------------------------------


def _module(num_classes: int = 10) -> ImageClassifier:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))
    return ImageClassifier(model, num_classes, 1, OptimConfig(), SchedulerConfig())


def _batches(num_classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    sizes = (8, 8, 3)  # a short last batch
    return [
        (torch.randn(n, 3, 4, 4, generator=gen), torch.randint(0, num_classes, (n,), generator=gen))
        for n in sizes
    ]


def test_epoch_metrics_equal_torchmetrics():
    # the values torchmetrics' MeanMetric (weighted by images) and micro MulticlassAccuracy gave, to the
    # bit, on logits with ties (integer logits) and on a short last batch
    module, ref = _module(), {}
    ref["loss"] = MeanMetric()
    ref["acc1"] = MulticlassAccuracy(10, top_k=1, average="micro")
    ref["acc5"] = MulticlassAccuracy(10, top_k=5, average="micro")
    ref["loss_batchmean"], ref["acc1_batchmean"] = MeanMetric(), MeanMetric()
    with torch.no_grad():
        for split in ("train", "test"):
            for j, (x, y) in enumerate(_batches()):
                module._step((x, y), split, j)
            nn.init.zeros_(module.model[1].weight)  # the second split: integer logits, many ties
            module.model[1].bias.copy_(torch.tensor([1.0, 3, 3, 2, 3, 0, 1, 2, 3, 0]))
        for x, y in _batches():
            logits = module(x)
            loss = module.criterion(logits, y)
            ref["loss"].update(loss, weight=y.numel())
            ref["acc1"].update(logits, y)
            ref["acc5"].update(logits, y)
            ref["loss_batchmean"].update(loss)
            ref["acc1_batchmean"].update((logits.argmax(-1) == y).float().mean())
    got = module._compute("test")
    for name, metric in ref.items():
        scale = 1.0 if "loss" in name else 100.0
        want = metric.compute().item() * scale
        if "batchmean" in name:  # GlobalBatchMeans (global batches over DDP ranks) sums in float64
            assert got[f"test_{name}"] == pytest.approx(want, rel=1e-6), name
        else:
            assert got[f"test_{name}"] == want, name
    assert module._compute("train")["train_acc5"] > 0


def test_a_training_and_a_test_step_read_nothing_on_the_host():
    # on a GPU every value read on the host waits for the device; the torchmetrics defaults read 4-5
    # per step (their NaN checks, argument validation and one_hot's range check)
    module, (x, y) = _module(), _batches()[0]
    with OpLog() as log:
        module.training_step((x, y), 0).backward()
        with torch.no_grad():
            module.validation_step((x, y), 0)
    assert not log.count(SYNCING_OPS)
    module.metrics["train_loss"] = MeanMetric()
    module.metrics["train_acc5"] = MulticlassAccuracy(10, top_k=5, average="micro")
    with OpLog() as old:
        module.training_step((x, y), 0)
    assert old.count(SYNCING_OPS)["_local_scalar_dense"] >= 4


# -- the selection's float32 precision ----------------------------------------------------------------


def _flags() -> dict[str, str]:
    return {**matmul_precisions(), "legacy": torch.get_float32_matmul_precision()}


@pytest.mark.parametrize("compiled_op", [False, True])
def test_selection_runs_in_ieee_fp32_whatever_the_global_precision(
    compiled_op, monkeypatch, restore_precision
):
    seen = []
    topk = knn.selection.topk_last
    monkeypatch.setattr(knn.selection, "topk_last", lambda *a: seen.append(_flags()) or topk(*a))
    # the Python chunks (CUDA's path; the CPU kernels run inside the same full_fp32 scope of _select)
    monkeypatch.setattr(knn.selection.native, "serves", lambda *a: False)
    q = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 on oneDNN CPUs
    outside = _flags()
    if compiled_op:  # the op a torch.compile'd layer calls
        torch.ops.convnn.select(q, q, torch.arange(40), 4, "cosine", None, True, True, None)
    else:
        knn_select(q, q, 5)
    assert _flags() == outside and outside["cuda.matmul"] == "tf32" and outside["mkldnn.matmul"] == "bf16"
    assert seen
    for flags in seen:
        assert flags["legacy"] == "highest" and all(flags[b] == "ieee" for b in SELECTION_BACKENDS)


def test_full_fp32_restores_settings_made_through_the_new_api(restore_precision):
    # the per-backend API alone (the legacy getter then refuses to answer): only the backends are set
    _backend("cuda.matmul").fp32_precision = _backend("mkldnn.conv").fp32_precision = "tf32"
    before = matmul_precisions()
    with full_fp32():
        assert all(matmul_precisions()[b] == "ieee" for b in SELECTION_BACKENDS)
    assert matmul_precisions() == before


# -- chunk sizing ---------------------------------------------------------------------------------------


def test_cuda_chunks_are_sized_once_per_shape_and_device(monkeypatch):
    calls, free = [], {"bytes": 1 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: calls.append(d) or (free["bytes"], 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 << 30)
    knn.selection._device_chunk.cache_clear()
    try:
        device = torch.device("cuda", 0)
        first = knn.selection._auto_chunk(256, 4096, 1024, device)
        # a quarter of (driver free + cached but unused) bytes, in float32 scores of 256 images x 1024 keys
        assert first == ((3 << 30) // 16 // (256 * 1024), 256)
        free["bytes"] = 1 << 20  # the allocator's cache filled up: the chunk stays
        assert knn.selection._auto_chunk(256, 4096, 1024, device) == first and len(calls) == 1
        knn.selection._auto_chunk(128, 4096, 1024, device)  # a new shape asks again
        knn.selection._auto_chunk(256, 4096, 1024, torch.device("cuda", 1))  # so does a new device
        assert len(calls) == 3
    finally:
        knn.selection._device_chunk.cache_clear()


# -- the start-up check's RNG fork ----------------------------------------------------------------------


def test_startup_check_touches_no_gpu_rng(monkeypatch):
    # four visible GPUs (faked): forking every device's RNG would make a CUDA context on each of them
    touched = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": touched.append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": None)
    with pytest.warns(UserWarning, match="4 available devices"), torch.random.fork_rng():
        pass  # what the check did: the fake sees every GPU touched
    assert touched == [0, 1, 2, 3]
    touched.clear()
    cfg = tiny_cfg({"name": "convnn", "sampling": "random", "num_candidates": 4, "k": 3})
    states = []
    for check in (False, True):  # the check leaves the CPU's RNG where building the model left it
        torch.manual_seed(0)
        build_from_config(cfg, check_input=check)
        states.append(torch.get_rng_state())
    assert not touched and torch.equal(*states)


# -- the data feed --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "devices", "cpus", "options", "want"),
    [
        (False, 1, 16, {}, DataFeed(0, False, False, "cpu")),
        (True, 1, 16, {}, DataFeed(8, True, True, "device")),
        (True, 4, 16, {}, DataFeed(3, True, True, "device")),
        (True, 1, 2, {}, DataFeed(1, True, True, "device")),
        (True, 1, 16, {"num_workers": 0, "pin_memory": False}, DataFeed(0, False, False, "device")),
        (False, 1, 16, {"num_workers": 4, "pin_memory": True}, DataFeed(4, True, True, "cpu")),
    ],
)
def test_data_feed_defaults_for_the_device(gpu, devices, cpus, options, want, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert data_feed(DataConfig(**options), gpu, devices) == want


@pytest.mark.parametrize(("side", "size"), [(32, 224), (32, 64), (32, 96), (28, 224)])
def test_resize_on_the_device_is_torchvisions_cpu_resize(side, size):
    images = torch.randint(
        0, 256, (16, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(resize_like_cpu(images, size), TF.resize(images, [size, size], antialias=True))


def test_resize_on_the_device_is_torchvisions_cpu_resize_on_cifar_images():
    files = sorted((CIFAR10 / "test").glob("*/*.*"))[::50]  # 200 images, 20 of each class
    if not files:
        pytest.skip(f"no CIFAR-10 ImageFolder copy under {CIFAR10}")
    images = torch.stack([TF.pil_to_tensor(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(resize_like_cpu(images, 224), TF.resize(images, [224, 224], antialias=True))


def _png_folder(root: Path, side: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b", "c"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / split / label / f"{i}.png"
                )
    return root


def _batches_of(module: ImageDataModule) -> list[torch.Tensor]:
    module.setup()
    torch.manual_seed(0)  # the random crops and flips
    out = []
    for loader in (module.train_dataloader(), module.val_dataloader()):
        for batch in loader:
            out.append(module.on_after_batch_transfer(batch, 0)[0])
    return out


@pytest.mark.parametrize(
    ("name", "image_size"), [("imagefolder", 224), ("imagefolder", 32), ("synthetic", 64)]
)
def test_device_feed_gives_the_batches_of_the_cpu_feed(name, image_size, tmp_path):
    # ViT's 32 -> 224 (uint8 images resized on the device), VGG's 32 (only normalised there), float images
    options = {"augment": "crop_flip", "num_workers": 0, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    if name == "imagefolder":
        cfg = DataConfig(name="cifar10", root=str(_png_folder(tmp_path)), num_classes=3, **options)
    else:
        cfg = DataConfig(name="synthetic", train_size=12, test_size=6, **options)
    feeds = [DataFeed(0, False, False, where) for where in ("cpu", "device")]
    cpu, device = (_batches_of(ImageDataModule(cfg, image_size, 5, 4, feed=feed)) for feed in feeds)
    assert len(cpu) == len(device) > 0 and all(b.shape[-1] == image_size for b in device)
    assert all(b.dtype == torch.float32 for b in device)
    assert all(torch.equal(a, b) for a, b in zip(cpu, device, strict=True))


# -- determinism and the run record ---------------------------------------------------------------------


def test_deterministic_mode_is_warn_on_a_gpu_by_default():
    assert gpu.deterministic_mode(TrainerConfig(), gpu=False) is False
    assert gpu.deterministic_mode(TrainerConfig(), gpu=True) == "warn"
    for value in (True, False):
        assert gpu.deterministic_mode(TrainerConfig(deterministic=value), gpu=True) is value


def test_a_default_gpu_trainer_turns_on_deterministic_algorithms(tmp_path, monkeypatch):
    # a GPU faked for the choice; the flags Lightning sets are the same on any accelerator
    monkeypatch.setattr(gpu, "on_gpu", lambda trainer: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = validate_config(compose_train("model=vgg11", "layer=conv2d")[0])
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        train._build_trainer(cfg, tmp_path, False, [], Start("train"))
        assert (
            torch.are_deterministic_algorithms_enabled()
            and torch.is_deterministic_algorithms_warn_only_enabled()
        )
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_numerics_record_names_the_precisions():
    record = gpu.numerics_record(TrainerConfig(precision="bf16"), gpu=True)
    assert record["deterministic"] == "warn" and record["precision"] == "bf16"
    assert record["float32"]["selection"] == "ieee"
    assert set(record["float32"]) == {
        "cuda.matmul",
        "cudnn.conv",
        "mkldnn.matmul",
        "mkldnn.conv",
        "selection",
    }


# -- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.cuda
def test_cuda_vgg_trains_with_strict_deterministic_algorithms(size, monkeypatch):
    # AdaptiveAvgPool2d's CUDA backward has no deterministic kernel: torch would stop here
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as Lightning sets it
    torch.manual_seed(0)
    model = build_from_config(tiny_cfg(size=size))[0].cuda()
    x = torch.randn(4, 3, size, size, device="cuda")
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            torch.manual_seed(0)  # the same dropout masks
            out = model(x)
            grads.append(torch.autograd.grad(out.square().sum(), list(model.parameters())))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.cuda
def test_cuda_spatial_candidates_equal_the_cpu_ones_and_need_no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler = CandidateSampler("spatial", 25)
        cand = sampler.candidates(34 * 34, grid=(34, 34), device=torch.device("cuda"), padding=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(cand.cpu(), spatial_candidates(34 * 34, 25, (34, 34), 1))
    for end in range(300):
        for steps in range(1, end + 2, 3):
            assert torch.equal(linspace_trunc(end, steps, "cuda").cpu(), linspace_trunc(end, steps)), (
                end,
                steps,
            )


@pytest.mark.cuda
def test_cuda_training_and_test_steps_have_no_host_sync():
    module, (x, y) = _module().cuda(), _batches()[0]
    x, y = x.cuda(), y.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module.training_step((x, y), 0).backward()
        with torch.no_grad():
            module.validation_step((x, y), 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert module._compute("test")["test_acc1"] >= 0


@pytest.mark.cuda
def test_cuda_selection_ignores_a_tf32_global_setting(restore_precision):
    # near ties: 300 tokens of 16 channels; TF32 (10-bit mantissa) would swap some 8th / 9th neighbours
    q = torch.randn(4, 300, 16, generator=torch.Generator().manual_seed(0)).cuda()
    a, b = torch.randn(2, 512, 512, generator=torch.Generator().manual_seed(1)).cuda()
    values, idx = knn_select(q, q, 9, kind="dot")
    full = a @ b
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32_values, tf32_idx = knn_select(q, q, 9, kind="dot")
    assert torch.equal(idx, tf32_idx) and torch.equal(values, tf32_values)
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists from Ampere on: outside the selection
        assert not torch.equal(a @ b, full)  # it does apply


@pytest.mark.cuda
def test_cuda_device_transform_equals_the_cpu_transform():
    from convnn.train.data import build_transform

    cfg = DataConfig(name="cifar10", root="unused", mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    images = torch.randint(
        0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    cpu = torch.stack([build_transform(cfg, 224, train=False)(TF.to_pil_image(i)) for i in images])
    transform, batch = DeviceTransform(cfg, 224), images.cuda()
    transform(batch)  # the mean and std are copied once, on the first batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_device = transform(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_device.cpu(), cpu)


@pytest.mark.cuda
def test_cuda_default_training_is_repeatable(tmp_path, monkeypatch):
    # two runs of trainer=gpu with its defaults: the same numbers to the bit; the record says how
    from tests.test_train import convnn_train, curves

    overrides = ["trainer=gpu", "data=synthetic", "data.train_size=64", "data.test_size=32", "batch_size=32"]
    overrides += ["data.num_workers=null", "data.pin_memory=null", "epochs=2", "checkpoint.enabled=false"]
    overrides += ["model=vgg11", "model.width_mult=0.125", "model.hidden_features=32", "layer=branching"]
    overrides += ["layer.ratio=0.5", "layer.sampling=random", "layer.num_candidates=16"]
    overrides += ["trainer.progress_bar=none", "logger=none"]
    try:
        runs = [convnn_train(tmp_path / str(i), *overrides, monkeypatch=monkeypatch) for i in (0, 1)]
    finally:
        torch.use_deterministic_algorithms(False)
    records = [read_record(run) for run in runs]
    assert curves(records[0]) == curves(records[1])
    assert records[0]["numerics"]["deterministic"] == "warn"
    assert records[0]["data_feed"]["transforms"] == "device" and records[0]["data_feed"]["pin_memory"]

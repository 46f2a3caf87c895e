"""Data-parallel training (``trainer=ddp``) for real: 2 CPU processes over gloo.

The parts against independent references first (the global batches one process would see,
BatchNorm over the global batch, per-image and per-batch means over ranks, the frozen selection
projections); then whole ``convnn-train`` runs with 2 ranks, instrumented by a ``sitecustomize``
probe that logs who writes what and which random candidates each rank draws, checked against a
single-process evaluation of the checkpoint's weights, and killed with SIGKILL and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

from convnn.layers import build_layer, reset_sampling
from convnn.runs.records import read_record
from convnn.train.data import EpochShuffleSampler, RankBatches, global_batch_sizes
from convnn.train.distributed import GlooSyncBatchNorm, Start, rank_command, synchronise_batchnorm
from convnn.train.module import GlobalBatchMeans
from tests.test_train import QUIET, TINY_VGG, convnn_train, curves

ROOT = Path(__file__).resolve().parent.parent


# --- the global batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [37, 48, 50])
def test_eval_ranks_share_the_global_batches_and_see_every_image_once(world, n):
    batch = 12
    order = list(range(n))
    single = [b.tolist() for b in torch.arange(n).split(batch)]
    parts = [list(RankBatches(SequentialSampler(order), batch, r, world)) for r in range(world)]
    assert sorted(i for rank in parts for b in rank for i in b) == order  # once each, no padding
    for j, whole in enumerate(single):  # rank r's j-th batch is its part of global batch j
        assert [i for rank in parts if j < len(rank) for i in rank[j]] == whole
    assert [len(list(rank)) for rank in parts] == [
        len(RankBatches(SequentialSampler(order), batch, r, world)) for r in range(world)
    ]


def test_training_ranks_get_equal_parts_of_the_same_epoch_order():
    n, batch, world = 50, 12, 4  # global batches 12, 12, 12, 12, 2: the 2 left over are dropped
    assert global_batch_sizes(n, batch, world, train=True) == [12, 12, 12, 12]
    assert global_batch_sizes(54, batch, world, train=True) == [12, 12, 12, 12, 4]  # 6 -> 4
    assert global_batch_sizes(n, batch, 1, train=True) == [12, 12, 12, 12, 2]
    order = EpochShuffleSampler(n, seed=3)
    ranks = [RankBatches(EpochShuffleSampler(n, seed=3), batch, r, world, train=True) for r in range(world)]
    for epoch in (0, 5):
        order.set_epoch(epoch)
        for rank in ranks:
            rank.set_epoch(epoch)
        steps = [list(rank) for rank in ranks]
        assert [len(s) for s in steps] == [4] * world and {len(b) for s in steps for b in s} == {3}
        glued = [i for j in range(4) for s in steps for i in s[j]]
        assert glued == list(order)[:48]  # the single process's first 4 batches, in order


def test_a_resumed_rank_continues_with_the_data_order_of_the_uninterrupted_run():
    """Each rank's training batches of an epoch depend only on (seed, epoch, rank): a run resumed
    from the checkpoint of epoch 2 (``next_epoch`` 2), its global RNG reseeded by the resume,
    loads on every rank what the uninterrupted run loaded in its epoch 2."""
    from types import SimpleNamespace

    from convnn.train.config import DataConfig
    from convnn.train.data import ImageDataModule

    def module(rank: int, epoch: int = 0) -> ImageDataModule:
        data = ImageDataModule(DataConfig(name="synthetic"), 32, batch_size=12, eval_batch_size=12, seed=7)
        data.train_set = list(range(50))
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=epoch)
        return data

    for rank in (0, 1):
        batches = module(rank).train_batches()
        epochs = []
        for epoch in range(3):
            batches.set_epoch(epoch)
            epochs.append(list(batches))
        assert epochs[0] != epochs[1] != epochs[2] and [len(b) for b in epochs[2]] == [6, 6, 6, 6, 1]
        saved = module(rank, epoch=1).state_dict()  # the checkpoint at the end of the second epoch
        resumed = module(rank)
        torch.manual_seed(12345)
        resumed.load_state_dict(saved)
        assert saved == {"next_epoch": 2} and list(resumed.train_batches()) == epochs[2]


def test_one_rank_batches_are_the_plain_loader_batches():
    data = torch.arange(23)
    sampler = EpochShuffleSampler(23, seed=1)
    sampler.set_epoch(2)
    plain = [b.tolist() for b in DataLoader(data, batch_size=5, sampler=sampler)]
    assert [data[b].tolist() for b in RankBatches(sampler, 5)] == plain
    assert [data[b].tolist() for b in RankBatches(sampler, 5, train=True)] == plain


def test_batch_means_are_means_of_per_batch_means():
    metric = GlobalBatchMeans()
    losses, correct = [torch.tensor(1.0), torch.tensor(4.0)], [torch.tensor([1, 1, 0, 0]), torch.tensor([1])]
    for j, (loss, hits) in enumerate(zip(losses, correct, strict=True)):
        metric.update(j, loss, hits.bool(), len(hits))
    out = metric.compute()
    assert out["test_loss_batchmean"].item() == pytest.approx((1.0 + 4.0) / 2)
    assert out["test_acc1_batchmean"].item() == pytest.approx((0.5 + 1.0) / 2)
    assert out["test_images"].item() == 5


# --- two gloo processes: BatchNorm and metrics over the ranks ----------------------------------------


def _two_ranks(rank: int, store: str, out: str) -> None:
    """Rank ``rank`` of 2: its half of a batch through GlooSyncBatchNorm (forward, backward, running
    statistics) and its parts of 3 global test batches through GlobalBatchMeans."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64) * 3 + 2
    bn, _ = synchronise_batchnorm(nn.BatchNorm2d(3).double(), gpu=False)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    mine = x[3 * rank : 3 * rank + 3].clone().requires_grad_()
    y = bn(mine)
    weights = torch.arange(y.numel(), dtype=torch.float64).view_as(y) / 100
    (y * weights).sum().backward()
    metric = GlobalBatchMeans()
    parts = [(0, [2.0, 3.0]), (1, [5.0]), (2, [])] if rank == 0 else [(0, [7.0, 1.0]), (1, [])]
    for batch, values in parts:
        if values:
            metric.update(
                batch,
                torch.tensor(sum(values) / len(values)),
                torch.tensor([v > 2 for v in values]),
                len(values),
            )
    torch.save(
        {
            "y": y.detach(),
            "grad": mine.grad,
            "weight_grad": bn.weight.grad,
            "bias_grad": bn.bias.grad,
            "running": (bn.running_mean, bn.running_var),
            "means": metric.compute(),
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_gloo_sync_batchnorm_and_batch_means_equal_one_process_with_the_global_batch(tmp_path):
    store = str(tmp_path / "store")
    mp.start_processes(_two_ranks, args=(store, str(tmp_path)), nprocs=2, start_method="fork")  # no imports
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64) * 3 + 2
    bn = nn.BatchNorm2d(3).double()
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    whole = x.clone().requires_grad_()
    y = bn(whole)
    weights = torch.cat([torch.arange(y[:3].numel(), dtype=torch.float64).view_as(y[:3]) / 100] * 2)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), whole.grad)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], bn.bias.grad)
    for rank in ranks:
        torch.testing.assert_close(rank["running"], (bn.running_mean, bn.running_var))
    # global batches {2, 3, 7, 1}, {5}: means 3.25 and 5; top-1 ("> 2") 2/4 and 1/1
    for rank in ranks:
        means = {k: v.item() for k, v in rank["means"].items()}
        assert means == pytest.approx(
            {"test_loss_batchmean": (3.25 + 5) / 2, "test_acc1_batchmean": (0.5 + 1) / 2, "test_images": 5}
        )


def test_gloo_sync_batchnorm_outside_ddp_is_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5)
    plain = nn.BatchNorm2d(3)
    synced, layers = synchronise_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), gpu=False)
    assert layers == 1 and isinstance(synced[0], GlooSyncBatchNorm)
    torch.testing.assert_close(synced(x), plain(x))
    assert synced.state_dict().keys() == nn.Sequential(plain).state_dict().keys()


# --- linear projections with rho=ones --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [("convnn", (2, 4, 6, 6)), ("branching", (2, 4, 6, 6)), ("convnn_attention", (2, 10, 8))],
)
def test_selection_only_projections_are_frozen_and_every_trainable_parameter_gets_a_gradient(name, shape):
    """With rho=ones the hard top-k passes no gradient to w_q / w_k: they are frozen (so DDP, which
    expects a gradient for every trainable parameter, runs), and everything else still trains."""
    channels = shape[1] if name != "convnn_attention" else shape[2]
    layer = build_layer(name, channels, channels, projections="linear", rho="ones")
    layer(torch.randn(*shape)).square().sum().backward()
    frozen = {n for n, p in layer.named_parameters() if not p.requires_grad}
    assert frozen and all(n.split(".")[-2] in ("w_q", "w_k") for n in frozen)
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    softmax = build_layer(name, channels, channels, projections="linear", rho="softmax")
    assert all(p.requires_grad for p in softmax.parameters())


def test_a_further_rank_runs_the_same_job_in_the_same_run_directory(monkeypatch):
    """The command of rank 1 is the job's own overrides (a sweep's too), its quoted run directory and
    the job's extra config search path; never ``-m``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hydra = OmegaConf.create(
        {
            "overrides": {"task": ["seed=1", "layer.ratio=0.5"]},
            "runtime": {
                "output_dir": "/runs/default/layer.ratio=0.5,seed=1",
                "cwd": "/home/me",
                "config_sources": [
                    {"path": "file:///pkg/configs", "schema": "file", "provider": "main"},
                    {"path": "file:///my/configs", "schema": "file", "provider": "command-line"},
                    {"path": "pkg://hydra.conf", "schema": "pkg", "provider": "hydra"},
                ],
            },
        }
    )
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    command, cwd = rank_command()
    assert command[:3] == [sys.executable, "-m", "convnn.train.app"] and cwd == "/home/me"
    assert command[3:] == [
        "seed=1",
        "layer.ratio=0.5",
        "hydra.run.dir='/runs/default/layer.ratio=0.5,seed=1'",
        "hydra.output_subdir=null",
        "hydra.searchpath=['file:///my/configs']",
    ]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(command[3:])}
    assert parsed["hydra.run.dir"] == "/runs/default/layer.ratio=0.5,seed=1"
    assert parsed["hydra.searchpath"] == ["file:///my/configs"]
    assert Start(**json.loads(Start("train", resume_epoch=3).env()["CONVNN_DDP_START"])) == Start("train", 3)


def test_a_slurm_job_with_fewer_tasks_than_devices_stops_in_one_line(monkeypatch):
    """What a CPU DDP job met under SLURM when tasks followed GPUs: one task for 2 devices. It stops
    before any work, naming both and the remedy."""
    from convnn.train.config import TrainerConfig
    from convnn.train.distributed import check_slurm_tasks

    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_NAME", "convnn")
    with pytest.raises(ValueError) as e:
        check_slurm_tasks(TrainerConfig(accelerator="cpu", devices=2, strategy="ddp"))
    message = str(e.value)
    assert "\n" not in message and "devices=2" in message and "--ntasks-per-node=1" in message
    assert "tasks_per_node follows trainer.devices" in message
    check_slurm_tasks(TrainerConfig(accelerator="cpu", devices=1))  # one task, one device: fine


# --- whole runs: 2 ranks on CPU (gloo) -----------------------------------------------------------------

PROBE = '''
"""Test probe (tests/test_ddp.py), loaded by every python process started with its directory on
PYTHONPATH and CONVNN_TEST_PROBE set: logs who writes records, checkpoints and the lock, each training
step's batch size and each training draw of random candidates, per process, as JSON lines; with
CONVNN_TEST_HOLD_EPOCH=e rank 0 stops (sleeps) when 0-based epoch e starts, for the test to kill it."""
import json
import os
import time

if os.environ.get("CONVNN_TEST_PROBE"):
    import torch.distributed as dist

    from convnn.knn import candidates
    from convnn.runs import checkpoints, lock, records
    from convnn.train import module

    def log(kind, **data):
        rank = dist.get_rank() if dist.is_initialized() else None
        path = os.path.join(os.environ["CONVNN_TEST_PROBE"], f"{os.getpid()}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "pid": os.getpid(), "rank": rank, **data}) + "\\n")

    def after(owner, name, note):
        real = getattr(owner, name)

        def probed(*args, **kwargs):
            out = real(*args, **kwargs)
            note(out, *args, **kwargs)
            return out

        setattr(owner, name, probed)

    def drawn(out, n, r, generator=None, device=None):
        if generator is None:  # training: the global RNG
            log("draw", drawn=out.tolist())

    after(candidates, "random_candidates", drawn)
    after(records, "write_record", lambda out, path, record: log("record", status=record["status"]))
    after(checkpoints.AtomicCheckpointIO, "save_checkpoint", lambda out, *args, **kwargs: log("checkpoint"))
    after(lock.RunLock, "__enter__", lambda out, *args: log("lock"))
    after(module.ImageClassifier, "training_step",
          lambda out, self, batch, i: log("step", epoch=self.current_epoch, size=len(batch[1])))
    hold = os.environ.get("CONVNN_TEST_HOLD_EPOCH")
    real_start = module.ImageClassifier.on_train_epoch_start

    def on_train_epoch_start(self):
        if hold is not None and self.current_epoch == int(hold) and self.global_rank == 0:
            log("holding", epoch=self.current_epoch)
            time.sleep(3600)
        real_start(self)

    module.ImageClassifier.on_train_epoch_start = on_train_epoch_start
'''
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# 37 test images in global batches of 16: 16, 16, 5 -> per rank 8, 8, 3 and 8, 8, 2 (none repeated)
DATA = [
    "data=synthetic",
    "data.train_size=64",
    "data.test_size=37",
    "data.num_workers=0",
    "batch_size=32",
    "eval_batch_size=16",
]
RUN = [
    *DATA,
    *TINY_VGG,
    "model.dropout=0",
    "layer=convnn",
    "layer.sampling=random",
    "layer.num_candidates=16",
    "layer.projections=linear",
    "layer.rho=ones",
    "optim.name=sgd",  # updates in proportion to the gradients (Adam's first steps amplify rounding)
    "optim.lr=0.05",
    "epochs=2",
    "seed=0",
    *QUIET,
]


def start_run(out: Path, probe: Path, *args: str, hold: int | None = None) -> subprocess.Popen:
    """``convnn-train out_dir=out *args`` as rank 0 of its own process group, with the probe."""
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(probe), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CONVNN_TEST_PROBE": str(probe),
        "OMP_NUM_THREADS": "1",
    }
    if hold is not None:
        env["CONVNN_TEST_HOLD_EPOCH"] = str(hold)
    cmd = [sys.executable, "-m", "convnn.train.app", *args, f"out_dir={out}"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def probed(probe: Path, kind: str) -> list[dict[str, Any]]:
    """The probe's ``kind`` events of every process, in each process's order."""
    events = [
        json.loads(line) for path in sorted(probe.glob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    return [e for e in events if e["kind"] == kind]


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The backbone's state dict in the run's ``checkpoints/last.ckpt``."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}


def evaluate(run_dir: Path) -> dict[str, float]:
    """The test metrics of the run's checkpoint weights in this one process: per image, and the mean
    of per-batch means over the global batches (``eval_batch_size``), as the paper's reference."""
    from convnn.models import build_from_config
    from convnn.train.config import validate_config
    from convnn.train.data import ImageDataModule

    cfg = read_record(run_dir)["config"]
    typed = validate_config(cfg)
    model, (_, size, _) = build_from_config(cfg)
    model.load_state_dict(checkpoint_weights(run_dir))
    model.eval()
    reset_sampling(model, typed.seed)  # as every test epoch starts
    data = ImageDataModule(typed.data, size, typed.batch_size, typed.eval_batch_size, seed=typed.seed)
    data.setup()
    losses, hits, top5, batches = [], [], [], []
    with torch.no_grad():
        for x, y in data.val_dataloader():
            logits = model(x)
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            hits.append((logits.argmax(-1) == y).double())
            top5.append((logits.topk(5).indices == y[:, None]).any(-1).double())
            batches.append((losses[-1].mean().item(), hits[-1].mean().item()))
    return {
        "test_loss": torch.cat(losses).mean().item(),
        "test_acc1": 100 * torch.cat(hits).mean().item(),
        "test_acc5": 100 * torch.cat(top5).mean().item(),
        "test_loss_batchmean": sum(b[0] for b in batches) / len(batches),
        "test_acc1_batchmean": 100 * sum(b[1] for b in batches) / len(batches),
        "test_images": len(torch.cat(hits)),
    }


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-rank run launched as a sweep's job (``-m``: the further rank must run that job, not the
    sweep), to the end: its run directory, rank 0's pid, the probe's directory and the wall time."""
    out = tmp_path_factory.mktemp("ddp")
    began = time.monotonic()
    proc = start_run(out / "runs", out / "probe", "-m", *RUN, *DDP)
    output = finished(proc)
    assert "sweep summary: 1 finished, 0 skipped, 0 failed" in output
    [record] = (out / "runs").rglob("results.json")
    return {
        "run_dir": record.parent,
        "pid": proc.pid,
        "probe": out / "probe",
        "wall_s": time.monotonic() - began,
    }


def test_ddp_run_writes_one_record_lock_and_checkpoint_from_rank_0(ddp_sweep):
    run_dir, rank0 = ddp_sweep["run_dir"], ddp_sweep["pid"]
    record = read_record(run_dir)
    assert record["status"] == "finished" and [e["epoch"] for e in record["epochs"]] == [1, 2]
    ranks = record["distributed"].pop("ranks")
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] == rank0 != ranks[1]["pid"]
    assert record["distributed"] == {
        "world_size": 2,
        "batch_size_per_rank": 16,
        "eval_batch_size_per_rank": 8,
        "train_images_per_epoch": 64,
        "batchnorm_layers": 8,
        "sync_batchnorm": True,
    }
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "results.json"]  # no lock
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert len(list(run_dir.parent.parent.rglob("results.json"))) == 1
    probe = ddp_sweep["probe"]
    writers = {kind: {e["pid"] for e in probed(probe, kind)} for kind in ("record", "checkpoint", "lock")}
    assert writers == {"record": {rank0}, "checkpoint": {rank0}, "lock": {rank0}}
    assert len(probed(probe, "checkpoint")) == 2  # one per epoch
    # the global batch of 32 split over the ranks: 2 steps of 16 images per rank and epoch
    steps = sorted((e["rank"], e["epoch"], e["size"]) for e in probed(probe, "step"))
    assert steps == sorted([(r, epoch, 16) for r in (0, 1) for epoch in (0, 1) for _ in range(2)])
    # w_q / w_k of rho=ones only select: frozen, so DDP (find_unused_parameters=False) ran 4 steps
    assert record["trainable_params"] < record["params"]


def test_ddp_ranks_draw_the_same_random_candidates(ddp_sweep):
    """Training draws come from the global RNG, seeded alike on every rank for every epoch and used
    alike (equal per-rank batches): the ranks draw the same candidates, step by step."""
    draws = probed(ddp_sweep["probe"], "draw")
    per_rank = [[e["drawn"] for e in draws if e["rank"] == r] for r in (0, 1)]
    layers = 8  # one sampler per VGG-11 slot, one draw per training step
    assert len(per_rank[0]) == 2 * 2 * layers and per_rank[0] == per_rank[1]
    assert len({tuple(d) for d in per_rank[0]}) > layers  # they do change from step to step


def test_ddp_test_metrics_are_one_process_evaluation_over_exactly_the_test_split(ddp_sweep):
    """37 test images over 2 ranks: each counted once; per-image and per-batch-mean (global batches
    of 16) metrics equal this process's evaluation of the checkpoint's weights."""
    run_dir = ddp_sweep["run_dir"]
    final = read_record(run_dir)["final"]
    reference = evaluate(run_dir)
    assert final["test_images"] == reference["test_images"] == 37
    assert final == pytest.approx(reference, rel=1e-5, abs=1e-4)


@pytest.mark.slow
def test_ddp_with_synchronised_batchnorm_trains_as_one_process_with_the_global_batch(tmp_path, monkeypatch):
    """The same run (conv2d: no top-k, whose near-ties any rounding flips) in one process and over 2
    ranks: the same global batches, BatchNorm statistics and averaged gradients, so the same weights
    after its 4 steps up to rounding (measured: 8e-7 of the update; 5e-2 with per-rank BatchNorm,
    ``trainer.sync_batchnorm=false``)."""
    import lightning as L

    from convnn.models import build_from_config

    run = [*DATA, *TINY_VGG, "model.dropout=0", "layer=conv2d", "optim.name=sgd", "optim.lr=0.05"]
    run += ["epochs=2", "seed=0", *QUIET]
    finished(start_run(tmp_path / "ddp", tmp_path / "probe", *run, *DDP))
    [ddp] = (tmp_path / "ddp").rglob("results.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (Lightning gives each of 2 ranks half the cores)
    try:
        single = convnn_train(tmp_path / "one", *run, monkeypatch=monkeypatch)
    finally:
        torch.set_num_threads(threads)
    config = read_record(single)["config"]
    L.seed_everything(config["seed"], verbose=False)  # as convnn-train before it builds the model
    model, _ = build_from_config(config, check_input=True)
    start, two, one = model.state_dict(), checkpoint_weights(ddp.parent), checkpoint_weights(single)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    update = torch.cat([(one[k] - start[k]).flatten() for k in trained])
    apart = torch.cat([(two[k] - one[k]).flatten() for k in trained])
    assert update.norm() > 0.01 and apart.norm() / update.norm() < 1e-4
    for a, b in zip(read_record(ddp.parent)["epochs"], read_record(single)["epochs"], strict=True):
        assert [a[k] for k in ("train_loss", "test_loss", "test_images")] == pytest.approx(
            [b[k] for k in ("train_loss", "test_loss", "test_images")], rel=1e-5
        )


@pytest.mark.slow
def test_sigkill_of_the_whole_ddp_group_then_a_rerun_resumes(ddp_sweep, tmp_path):
    """Rank 0 is held at the start of epoch 2, after epoch 1's checkpoint: the test sends SIGKILL to
    the whole group (both ranks). The lock it leaves names rank 0; a re-run takes it over, resumes
    from the checkpoint and ends with the uninterrupted run's curves exactly (the same data order)."""
    out = tmp_path / "runs"
    began = time.monotonic()
    proc = start_run(out, tmp_path / "probe", *RUN, *DDP, hold=1)
    deadline = time.monotonic() + 600
    while not probed(tmp_path / "probe", "holding"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    [record] = out.rglob("results.json")
    run_dir = record.parent
    killed = read_record(run_dir)
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == proc.pid
    assert [p.relative_to(out) for p in out.rglob("run.lock")] == [(run_dir / "run.lock").relative_to(out)]
    assert (killed["status"], len(killed["epochs"])) == ("running", 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rank1 = killed["distributed"]["ranks"][1]["pid"]
    deadline = time.monotonic() + 30
    while Path(f"/proc/{rank1}").exists() and time.monotonic() < deadline:  # reaped by init
        time.sleep(0.1)
    assert not Path(f"/proc/{rank1}").exists()

    output = finished(start_run(out, tmp_path / "probe2", *RUN, *DDP))
    assert f"took over the stale lock of pid {proc.pid}" in output
    assert f"resuming {run_dir} from epoch 2 of 2" in output
    resumed = read_record(run_dir)
    assert resumed["status"] == "finished" and resumed["started_at"] == killed["started_at"]
    assert curves(resumed) == curves(read_record(ddp_sweep["run_dir"]))
    assert not (run_dir / "run.lock").exists()
    took = time.monotonic() - began
    print(f"DDP wall time: sweep job {ddp_sweep['wall_s']:.1f} s, kill + resume {took:.1f} s")


@pytest.mark.slow
def test_a_sweep_runs_ddp_jobs_one_after_another_in_its_process(tmp_path):
    """The basic launcher runs a sweep's jobs in the sweep's own process: after a DDP job that
    process must look as before (no launch variables, no process group), or the next job's further
    rank is never started and rank 0 waits for it."""
    run = [*DATA, *TINY_VGG, "layer=conv2d", "epochs=1", *QUIET]
    output = finished(start_run(tmp_path / "runs", tmp_path / "probe", "-m", *run, *DDP, "seed=0,1"))
    assert "sweep summary: 2 finished, 0 skipped, 0 failed" in output
    records = [read_record(p) for p in sorted((tmp_path / "runs").rglob("results.json"))]
    assert [r["config"]["seed"] for r in records] == [0, 1]
    ranks = [[rank["pid"] for rank in r["distributed"]["ranks"]] for r in records]
    assert ranks[0][0] == ranks[1][0] and ranks[0][1] != ranks[1][1]  # one sweep process, two rank 1s


@pytest.mark.slow
def test_a_local_launcher_job_runs_its_ranks_in_its_own_process(tmp_path):
    """``hydra/launcher=local``: the job runs in a submitit process, which starts its further rank as
    ``python -m convnn.train.app`` with the job's overrides; the record names the local job and both
    ranks, and counts every test image once."""
    from tests.test_launch import sweep_command
    from tests.test_slurm import EXPERIMENT

    search = tmp_path / "configs"
    (search / "experiment").mkdir(parents=True)
    (search / "experiment" / "tiny.yaml").write_text(EXPERIMENT.format(train_size=64, epochs=1, sweeper="{}"))
    command = sweep_command(search, tmp_path / "runs", "hydra/launcher=local", *DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "sweep summary: 1 finished, 0 skipped, 0 failed" in done.stdout
    [path] = (tmp_path / "runs").rglob("results.json")
    record = read_record(path)
    assert record["status"] == "finished" and record["launcher"]["scheduler"] == "local"
    ranks = record["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
    assert record["final"]["test_images"] == 32 and record["distributed"]["batch_size_per_rank"] == 16
    assert sorted(p.name for p in path.parent.iterdir()) == [".hydra", "checkpoints", "results.json"]

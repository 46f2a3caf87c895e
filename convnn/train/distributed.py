"""Data-parallel training (``trainer=ddp``, or ``trainer.devices`` x ``trainer.num_nodes`` > 1).

One run, N processes (ranks), one run directory. Rank 0 is the run: it holds the directory's lock,
decides whether the run starts afresh, resumes or is already finished (:class:`Start`), and alone
writes the record, the checkpoints and the logs. The other ranks follow its decision:

- on one machine rank 0 starts them when training begins (:class:`DDPStrategy`), each as
  ``python -m convnn.train.app <this job's overrides>`` in the same run directory, with the decision
  in the environment (``CONVNN_DDP_START``). Lightning's own launcher reruns the whole command line,
  which in a sweep (``-m``) would rerun the sweep;
- under SLURM ``srun`` starts every task: they join the process group at once and rank 0
  broadcasts its decision (:func:`follow_start`, :func:`announce_start`).

BatchNorm normalises over the global batch when ``trainer.sync_batchnorm`` is on
(:func:`synchronise_batchnorm`), as one process with the whole batch would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy as LightningDDP
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from convnn.runs.records import RunRecord
from convnn.train.config import TrainerConfig
from convnn.train.gpu import on_gpu

START_ENV = "CONVNN_DDP_START"  # rank 0's decision, in the environment of the ranks it starts
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def world_size(trainer: TrainerConfig) -> int:
    """Processes in the run: ``trainer.devices * trainer.num_nodes``."""
    return trainer.devices * trainer.num_nodes


def data_parallel(trainer: TrainerConfig) -> bool:
    """Whether the run trains with DDP (``strategy=ddp`` or more than one device)."""
    return trainer.strategy == "ddp" or world_size(trainer) > 1


def slurm_tasks() -> int:
    """The tasks ``srun`` started for this job step (0 outside SLURM, or where Lightning does not use
    SLURM's environment: an interactive allocation)."""
    return int(os.environ.get("SLURM_NTASKS", 1)) if SLURMEnvironment.detect() else 0


def check_slurm_tasks(trainer: TrainerConfig) -> None:
    """``ValueError`` (one line) when a SLURM job's tasks do not match the trainer's devices and nodes."""
    if not slurm_tasks():
        return
    try:
        SLURMEnvironment(auto_requeue=False).validate_settings(trainer.devices, trainer.num_nodes)
    except ValueError as e:
        raise ValueError(
            f"{' '.join(str(e).split())} Launch with hydra/launcher=slurm (tasks_per_node follows "
            "trainer.devices), or srun --ntasks-per-node=trainer.devices"
        ) from None


def launch_rank(trainer: TrainerConfig) -> int:
    """This process's global rank before Lightning sets it: the SLURM task (``SLURM_PROCID``), the
    rank :class:`DDPStrategy` gave a process it started, else 0."""
    if START_ENV in os.environ:
        return int(os.environ.get("NODE_RANK", 0)) * trainer.devices + int(os.environ["LOCAL_RANK"])
    if slurm_tasks() > 1:
        return int(os.environ["SLURM_PROCID"])
    return 0


@dataclass
class Start:
    """Rank 0's decision for a launch: ``train`` (``resume_epoch``: the checkpoint's epochs, ``None``
    for a fresh start), ``finished`` (``final``: its test top-1) or ``stop`` (rank 0 stopped before
    training: it reports why)."""

    action: str
    resume_epoch: int | None = None
    final: float | None = None

    def env(self) -> dict[str, str]:
        """The environment that hands this decision to a rank :class:`DDPStrategy` starts."""
        return {START_ENV: json.dumps(asdict(self))}


def _join(trainer: TrainerConfig) -> None:
    """Join the SLURM job's process group now (Lightning's DDP then finds it joined): NCCL on GPUs
    (each task on its local GPU), gloo on CPUs."""
    if dist.is_initialized():
        return
    env = SLURMEnvironment(auto_requeue=False)
    backend = "gloo"
    if on_gpu(trainer):
        torch.cuda.set_device(env.local_rank())
        backend = "nccl"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
    dist.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size())


def _broadcast(start: Start | None, trainer: TrainerConfig) -> Start:
    box = [start]
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu(trainer) else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def announce_start(start: Start, trainer: TrainerConfig) -> None:
    """Rank 0: give ``start`` to the SLURM tasks waiting in :func:`follow_start` (the ranks it starts
    itself get it from :meth:`Start.env`)."""
    if slurm_tasks() > 1:
        _join(trainer)
        _broadcast(start, trainer)


def follow_start(trainer: TrainerConfig) -> Start:
    """Ranks > 0: rank 0's decision, from the environment or (SLURM) its broadcast."""
    if START_ENV in os.environ:
        return Start(**json.loads(os.environ[START_ENV]))
    _join(trainer)
    return _broadcast(None, trainer)


def _quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (run directories hold ``=`` and ``,``)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rank_command() -> tuple[list[str], str]:
    """The command line and working directory of a further rank of the current Hydra job: the job's
    own overrides (a sweep's job too), its run directory and config search path."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sources = [s.path for s in hc.runtime.config_sources if s.schema == "file" and s.provider != "main"]
    command = [sys.executable, "-m", "convnn.train.app", *hc.overrides.task]
    command += [f"hydra.run.dir={_quoted(hc.runtime.output_dir)}", "hydra.output_subdir=null"]
    if sources:
        command.append(f"hydra.searchpath=[{','.join(_quoted(s) for s in sources)}]")
    return command, hc.runtime.cwd


class _RankWatch(_ChildProcessObserver):
    """Lightning's watch over the further ranks: when one dies, it kills them all and rank 0 (whose
    collectives would otherwise wait for the dead rank forever). Disarmed once rank 0 has left
    training (:meth:`DDPStrategy.teardown`): a rank that stops after that (an error every rank met)
    must not kill a rank 0 that is recording it, or has moved on to a sweep's next job."""

    def __init__(self, children: list[subprocess.Popen]) -> None:
        super().__init__(main_pid=os.getpid(), child_processes=children)
        self.armed = True

    def _run(self) -> bool:
        return not self.armed or super()._run()


class _RankLauncher(_SubprocessScriptLauncher):
    """Lightning's one-machine launcher, starting the further ranks with :func:`rank_command` and
    rank 0's decision (``env``) in their environment, watched by :class:`_RankWatch`."""

    def __init__(self, *args: Any, env: dict[str, str]) -> None:
        super().__init__(*args)
        self.env = env
        self.watch: _RankWatch | None = None

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.watch = _RankWatch(self.procs)
            self.watch.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        cluster = self.cluster_environment
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = cluster.main_address, str(cluster.main_port)
        os.environ["NODE_RANK"], os.environ["LOCAL_RANK"] = (
            str(cluster.node_rank()),
            str(cluster.local_rank()),
        )
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        command, cwd = rank_command()
        for local_rank in range(1, self.num_processes):
            env = {**os.environ, **self.env, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=env, cwd=cwd))


class DDPStrategy(LightningDDP):
    """Lightning's DDP (every parameter gets a gradient: ``find_unused_parameters=False``) whose
    further ranks on this machine are started by :class:`_RankLauncher` with ``env``."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(find_unused_parameters=False)
        self.env = env

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = _RankLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes, env=self.env
        )

    def teardown(self) -> None:
        """Training is over (or failed) on this rank: stop watching the further ranks first."""
        if isinstance(self._launcher, _RankLauncher) and self._launcher.watch is not None:
            self._launcher.watch.armed = False
        super().teardown()


@contextmanager
def session() -> Iterator[None]:
    """Leave the process as it was after a DDP run (a sweep runs its next job in it): the launch
    variables, the thread count and no process group."""
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)


class _SumOverRanks(torch.autograd.Function):
    """``x`` summed over the ranks; the gradient of each rank's ``x`` is the ranks' gradients summed
    (every rank's loss depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover every rank's part of the global batch, for CPU
    ranks (gloo), where torch's SyncBatchNorm refuses to run: the mean, then the centred sum of
    squares, each summed over the ranks by a differentiable all-reduce. ``[B, C, *] -> same``;
    outside DDP (or in eval mode) it is ``BatchNorm``."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() // x.shape[1])
        total = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                )
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def synchronise_batchnorm(model: nn.Module, gpu: bool) -> tuple[nn.Module, int]:
    """``model`` with every BatchNorm layer synchronised over the ranks, and how many: torch's
    ``SyncBatchNorm`` on GPUs, :class:`GlooSyncBatchNorm` on CPUs. Parameters, statistics and
    state-dict keys stay as they were (checkpoints load either way)."""
    layers = sum(isinstance(m, _BatchNorm) for m in model.modules())
    if gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), layers

    def convert(module: nn.Module) -> nn.Module:
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
            out = GlooSyncBatchNorm(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            for name, tensor in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]:
                setattr(out, name, tensor)  # the same tensors, as torch's convert_sync_batchnorm
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(model), layers


def rank_info() -> dict[str, Any]:
    """Who this rank is, for the record: rank, host, pid and (under SLURM) task and node."""
    env = os.environ
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_task": int(env["SLURM_PROCID"]) if "SLURM_PROCID" in env else None,
        "slurm_node": env.get("SLURMD_NODENAME"),
    }


def gather_ranks() -> list[dict[str, Any]]:
    """:func:`rank_info` of every rank, in rank order (a collective under DDP)."""
    mine = rank_info()
    if not dist.is_initialized():
        return [mine]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


class RankRoster(Callback):
    """Puts every rank's :func:`rank_info` into ``record.data["distributed"]["ranks"]`` (and writes
    it) once the ranks have joined, before training starts."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.record.data.setdefault("distributed", {})["ranks"] = gather_ranks()
        self.record.update(self.record.epochs)

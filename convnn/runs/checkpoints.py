"""Checkpoint files of a run: ``checkpoints/last.ckpt``, written atomically and checked before resuming.

Lightning writes a checkpoint straight into its final path, so a full disk or a kill mid-write leaves
a truncated ``last.ckpt``. :class:`AtomicCheckpointIO` writes a temp file beside it and renames it
over the old one (the old checkpoint stays whole until the new one is); :func:`checkpoint_epochs`
reads a checkpoint's zip index and CRCs without building tensors, so a damaged file is named in one
line before any training starts.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from convnn.runs.records import atomic_write

LAST_CHECKPOINT = "last"  # checkpoints/last.ckpt, replaced after every epoch


class CheckpointError(ValueError):
    """An unreadable checkpoint; ``str(error)`` is one line naming the file and the problem."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, then into a temp file in the checkpoint's directory, fsync and
    ``os.replace`` (a full disk raises ``OSError`` ENOSPC, not torch's opaque writer error).
    ``on_written`` is called once the new file is in place, and only then: a signal during the write
    leaves the old checkpoint, and whoever counts checkpointed epochs must not count this one."""

    def __init__(self, on_written: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.on_written = on_written

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)
        if self.on_written is not None:
            self.on_written()


def checkpoint_epochs(path: str | Path) -> int:
    """The number of finished epochs a Lightning checkpoint holds; ``CheckpointError`` when the file
    is truncated or corrupt (every stored member's CRC is checked) or not a Lightning checkpoint."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} is corrupt (bad CRC in {bad})")
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'epoch')")
    return int(state["epoch"]) + 1

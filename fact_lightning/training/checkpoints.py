"""Checkpoint files that survive a kill: atomic writes in their own folder, and a resume that finds an intact one."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..errors import UserError

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs it and renames it over the target.

    Lightning's own writer stages the file through the temporary-files folder, which is a rename only when
    ``$TMPDIR`` shares the checkpoint folder's filesystem (with ``TMPDIR=/dev/shm`` a kill during a save left
    a 0-byte ``last.ckpt``). A rename within the folder is atomic on every local filesystem. Loading is
    ``torch.load(weights_only=True)``: checkpoints hold tensors and plain values only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed during a save
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(path.parent)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable (the folder's entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_intact(path: Path) -> bool:
    """Whether a checkpoint file is a complete torch zip archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def resolve_last(folder: Path) -> Path:
    """The checkpoint ``--ckpt_path last`` means: ``last.ckpt``, or the newest intact checkpoint if it is damaged.

    Raises :class:`UserError` when the folder holds no intact checkpoint at all (rather than starting at step 0).
    """
    folder = Path(folder)
    last = folder / LAST
    if last.is_file() and is_intact(last):
        return last
    candidates = sorted((p for p in folder.glob("*.ckpt") if p.name != LAST and not p.name.startswith(".")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if is_intact(path):
            if last.exists():
                log.warning("%s is damaged (an interrupted save?); resuming from %s instead", last, path.name)
            return path
        log.warning("%s is damaged; skipping it", path)
    if last.exists() or candidates:
        raise UserError(f"--ckpt_path last: every checkpoint in {folder} is damaged; nothing to resume from")
    raise UserError(f"--ckpt_path last: no checkpoint in {folder} to resume from (start without --ckpt_path)")

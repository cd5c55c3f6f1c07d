"""Checkpoint files that survive a kill: atomic writes in their own folder, one reader that says what a file is
not, and a resume that finds the newest intact step whatever the files are called."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..errors import UserError
from ..files import fsync_folder, write_failure

log = logging.getLogger(__name__)

LAST = "last.ckpt"
HPC_PATTERN = "hpc_ckpt_*.ckpt"  # Lightning's SLURM requeue checkpoints, in the run folder itself
TRAINING_KEYS = ("global_step", "epoch", "state_dict")  # what every Lightning training checkpoint holds


class NotACheckpoint(UserError):
    """A file given or found as a training checkpoint that is not one (damaged, truncated, another format)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs it and renames it over the target.

    Lightning's own writer stages the file through the temporary-files folder, which is a rename only when
    ``$TMPDIR`` shares the checkpoint folder's filesystem (with ``TMPDIR=/dev/shm`` a kill during a save left
    a 0-byte ``last.ckpt``). A rename within the folder is atomic on every local filesystem. A failed write
    (a full disk) removes the temporary file and ends in one :class:`UserError` naming the checkpoint.
    Loading is :func:`read_checkpoint`: ``weights_only=True``, and one error naming the file for anything else.
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
        except Exception as exc:
            failure = write_failure(exc)
            if failure is None:
                raise
            raise UserError(f"cannot write the checkpoint {path}: {failure.strerror or failure}; nothing was "
                            "written (the previous checkpoints are intact)") from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_folder(path.parent)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False,
                    verify: bool = False) -> dict[str, Any]:
    """The training state in a checkpoint file, loaded with ``weights_only=True`` (tensors and plain values).

    Anything else raises :class:`NotACheckpoint` (a missing file ``FileNotFoundError``) naming the file and
    what it is instead: not a torch archive (random bytes, a truncated or damaged save, an adapter export),
    an archive with Python objects in it, or a file without training state (a plain state dict).
    ``mmap`` maps the tensors instead of reading them (cheap: only the small pickle is read); ``verify``
    first checks every member's CRC (a full read: torch itself loads a flipped bit without a word).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"checkpoint {what}: {path}")
    if not zipfile.is_zipfile(path):
        if _looks_like_safetensors(path):
            raise NotACheckpoint(f"{path} is an adapter file (safetensors), not a training checkpoint: resume from "
                                 "a .ckpt file in the run's checkpoints/ folder")
        raise NotACheckpoint(f"{path} is not a training checkpoint: not a complete torch checkpoint archive "
                             "(damaged, truncated or another format)")
    if verify and not is_intact(path):
        raise NotACheckpoint(f"{path} is damaged: a checksum of its contents fails")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: never for a file we resume
        raise NotACheckpoint(f"{path} is not a training checkpoint: it holds Python objects other than tensors "
                             "and plain values") from None
    except Exception as exc:  # a damaged archive: torch raises RuntimeError, zipfile and pickle their own
        raise NotACheckpoint(f"{path} is not a readable training checkpoint ({type(exc).__name__}): damaged or "
                             "truncated") from None
    if not isinstance(state, dict) or not all(key in state for key in TRAINING_KEYS):
        missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
        raise NotACheckpoint(f"{path} is not a training checkpoint: it has no {', '.join(missing)} (a plain state "
                             "dict or weights alone cannot resume a run)")
    return state


def is_intact(path: Path) -> bool:
    """Whether a checkpoint file is a complete torch zip archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _progress(state: dict) -> tuple[int, int, int]:
    """(global step, batches processed, epochs completed): the order of two saves of one run."""
    loops = (state.get("loops") or {}).get("fit_loop") or {}
    batches = (loops.get("epoch_loop.batch_progress") or {}).get("total", {}).get("processed", 0)
    epochs = (loops.get("epoch_progress") or {}).get("total", {}).get("completed", 0)
    return int(state["global_step"]), int(batches or 0), int(epochs or 0)


def _step_of(path: Path) -> tuple[int, int, int] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return _progress(state)
    except Exception:  # damaged, truncated, or not ours: not a candidate
        return None


def resolve_last(folder: Path, extra: Iterable[Path] = ()) -> Path:
    """The checkpoint ``--ckpt_path last`` means: the newest intact training state among the ``.ckpt`` files
    in ``folder`` (and ``extra``), by the step stored in each, whatever the files are called.

    A name says nothing reliable: after a run folder was moved or copied, Lightning wrote ``last-v1.ckpt``
    beside a stale ``last.ckpt``, and a save killed half-way leaves a damaged one. Reading the step is
    cheap (the tensors are memory-mapped, not read); only the chosen file is checked whole (its CRCs).
    Raises :class:`UserError` when no intact checkpoint is there (rather than starting at step 0).
    """
    folder = Path(folder)
    paths = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")] + [p for p in extra if p.is_file()]
    found, damaged = [], []
    for path in paths:
        progress = _step_of(path)
        if progress is None:
            damaged.append(path)
        else:  # the newest progress first; at equal progress the most recent write, then last.ckpt
            found.append((progress, path.stat().st_mtime, path.name == LAST, path))
    found.sort(key=lambda item: item[:3], reverse=True)
    chosen = None
    for *_, path in found:
        if is_intact(path):
            chosen = path
            break
        damaged.append(path)
    for bad in damaged:
        log.warning("%s is damaged (an interrupted save?); skipping it", bad)
    if chosen is None and damaged:
        raise UserError(f"--ckpt_path last: every checkpoint in {folder} is damaged; nothing to resume from")
    if chosen is None:
        raise UserError(f"--ckpt_path last: no checkpoint in {folder} to resume from (start without --ckpt_path)")
    last = folder / LAST
    if chosen != last and last.exists() and last not in damaged:
        log.warning("resuming from %s: it holds a newer step than %s", chosen.name, LAST)
    return chosen

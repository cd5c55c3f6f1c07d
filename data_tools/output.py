"""The output folder of `fact-data build` and `add-latents`: its lock, leftover temporary files, OS errors as
one UserError, the compute device."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from fact_lightning.data import shards
from fact_lightning.errors import UserError
from fact_lightning.files import FolderBusy, locked_folder

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def os_errors(what: str) -> Iterator[None]:
    """OSError (a full disk, a read-only folder) -> one UserError naming the file."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"{what}: {exc.strerror or exc}{where}") from None


@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[None]:
    """Create ``out`` and hold its lock for the duration (the library's kernel lock, dropped when the process
    dies): a second build into it refuses at once. A folder created here and left empty by an error is removed."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    with contextlib.ExitStack() as held:
        try:
            with os_errors(f"cannot write to --out {out}"):  # taking the lock, not the build's own writes
                held.enter_context(locked_folder(out, shards.LOCK_NAME))
        except FolderBusy as busy:
            raise UserError(f"another fact-data build (pid {busy.holder}) is writing to {out}; wait for it to "
                            "end or choose another --out") from None
        yield


def clean_tmp(out: Path) -> None:
    for path in out.iterdir():
        if path.name.endswith(shards.TMP_SUFFIX):
            logger.info("removing %s (left by an interrupted run)", path)
            path.unlink()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device

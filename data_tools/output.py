"""The output folder of `fact-data build` and `add-latents`: its lock, leftover temporary files, OS errors as
one UserError, the compute device."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from fact_lightning.data import shards
from fact_lightning.errors import UserError

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
    """Create ``out`` and hold its lock for the duration: a second build into it refuses at once. A folder
    created here and left empty by an error is removed again."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    created = not out.exists()
    path = out / shards.LOCK_NAME
    with os_errors(f"cannot write to --out {out}"):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            created = False
            raise UserError(f"another fact-data build (pid {holder}) is writing to {out}; wait for it to end "
                            "or choose another --out") from None
        with os_errors(f"cannot write to --out {out}"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [shards.LOCK_NAME]:
            path.unlink()
            out.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


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

"""Safe file writes, folder locks and content hashes: a file or an assembled folder is either its old self or
its complete new self, and a folder that a run owns has one owner at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tmp_path(path: str | Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file written at ``path + '.tmp'``: on a clean exit it is flushed, fsynced and renamed over
    ``path``; on any error (a full disk included) the temporary file is removed and the error goes on."""
    tmp = tmp_path(path)
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes beside ``path`` (same filesystem), fsync them and rename them over ``path``."""
    with atomic_open(path) as f:
        f.write(data)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it and swap it in with os.replace."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


# --- folders: one owner at a time, assembled whole ------------------------------------------------------
class FolderBusy(UserError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by process {holder}")
        self.folder, self.holder = folder, holder


@contextlib.contextmanager
def locked_folder(folder: str | Path, lock_name: str) -> Iterator[Path]:
    """Creates ``folder`` and holds an exclusive lock on ``folder/lock_name`` while the block runs.

    The lock is ``flock`` on an open file, so the kernel drops it when the process dies in any way (SIGKILL
    included): a stale lock file never blocks the next run. A second holder gets :class:`FolderBusy` at once,
    naming the holder's pid. A folder this call created and an error left holding only the lock file is
    removed again, so a launch that fails before writing anything leaves nothing behind.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(folder))
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            created = False
            raise FolderBusy(folder, os.pread(fd, 32, 0).decode(errors="replace").strip() or "?") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [lock_name]:
            path.unlink()
            folder.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def fsync_folder(folder: str | Path) -> None:
    """Makes renames into ``folder`` durable (its entries), where the platform allows it."""
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


def staging_name(dest: str | Path, tag: str = "tmp") -> Path:
    """``dir/.name.<tag>-<pid>``: a hidden sibling of ``dest`` on the same filesystem (a rename, not a copy)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{tag}-{os.getpid()}")


def remove_staging(folder: str | Path) -> None:
    """Removes what killed writers left in ``folder``: the hidden ``.name.tmp-<pid>`` / ``.name.old-<pid>``."""
    for path in Path(folder).glob(".*.*-*"):
        if path.name.rpartition("-")[0].endswith((".tmp", ".old")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def replace_path(staged: str | Path, dest: str | Path) -> None:
    """Moves a complete ``staged`` file, folder or symlink to ``dest``, replacing what is there.

    A rename puts it in place; a folder already at ``dest`` is renamed aside first and removed afterwards
    (rename(2) does not replace a non-empty folder), so at every moment ``dest`` is absent, the old or the
    new complete entry, never a mixture.
    """
    staged, dest = Path(staged), Path(dest)
    old = None
    if dest.is_dir() and not dest.is_symlink():
        old = staging_name(dest, "old")
        os.rename(dest, old)
    elif staged.is_dir() and not staged.is_symlink() and (dest.is_symlink() or dest.exists()):
        dest.unlink()  # a folder cannot be renamed over a file or a link
    os.replace(staged, dest)
    fsync_folder(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def assembled_folder(dest: str | Path) -> Iterator[Path]:
    """Yields an empty staging folder beside ``dest``; on a clean exit its files are fsynced and it replaces
    ``dest`` whole (:func:`replace_path`); on any error (a full disk, a signal) it is removed and the error
    goes on. So ``dest`` is only ever absent or complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_name(dest)
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    try:
        yield staged
        for path in staged.iterdir():
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_folder(staged)
        replace_path(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None: torch wraps the one its writer hit in a RuntimeError (as
    ``__context__``), safetensors names its number in its own error's text ("os error 28")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        found = _OS_ERROR_IN_TEXT.search(str(exc))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        exc = exc.__cause__ or exc.__context__
    return None

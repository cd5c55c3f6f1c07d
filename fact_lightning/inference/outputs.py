"""Reading a command's input images and writing its output folder, with errors that name the file.

An :class:`OutputFolder` never overwrites or deletes earlier results. Checked before any work (a run must
not load every model and then find it cannot write), it is assembled aside, in a hidden sibling
``.NAME.partial-PID``, and put in place by one rename when the run succeeds: a run that fails, is
interrupted (Ctrl-C) or stopped (SIGTERM, which ``run_app`` turns into an exception) leaves the earlier
folder as it was and no partial new one. A non-empty folder is replaced only with ``overwrite``, and then
by an atomic swap. The folder's lock (an flock on the folder itself) makes a second run into the same
place refuse at once instead of mixing files with the first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fact_lightning.errors import UserError

log = logging.getLogger(__name__)

STAGING = ".{name}.partial-"  # + pid: the sibling a run assembles its folder in
_REPLACED = ".{name}.replaced-"  # + pid: the old folder for a moment, where the swap is not atomic


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """RGB uint8 (H, W, 3) of the image file at ``path``, decoded as fact-data decodes photos.

    Raises FileNotFoundError (missing, or a directory) or ValueError (not an image, damaged, too large)
    with ``what``, the path and the reason (fact-data's reject names).
    """
    from fact_lightning.faces.decode import decode_image

    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what} {path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    decoded = decode_image(path.read_bytes())
    if decoded.image is None:
        raise ValueError(f"{what} {path} cannot be used: {decoded.reason} {decoded.detail}".strip())
    return decoded.image


def _check_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"output folder {root} is a file")
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"output folder {root} cannot be created: {existing} is a file")
    try:  # the one reliable test (permissions, read-only filesystems, root's rights): write something
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(f"output folder {root} is not writable: cannot write in {existing} "
                              f"({err.strerror or err})") from None


def _busy(root: Path) -> UserError:
    return UserError(f"another run is writing to {root}: wait for it to end, or choose another --out")


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without it (some overlays)
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class OutputFolder:
    """The folder a command writes: checked on creation, assembled aside inside ``with``, swapped in on success.

    ``overwrite``: a non-empty folder is replaced (whole, when the new one is complete); without it a
    non-empty folder is refused. Files go where :meth:`path` and :meth:`folder` say (inside the staging
    sibling while the run lasts).
    """

    def __init__(self, root: str | Path, *, overwrite: bool = False):
        self.given = Path(root)
        # A link to a folder: the folder is what gets replaced, the link stays.
        self.root = Path(os.path.realpath(self.given)) if self.given.is_symlink() else self.given
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._fd: int | None = None
        self._created: list[Path] = []
        _check_writable(self.root)
        if self.root.is_dir():  # refuse now, not after the models have loaded
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._try_lock(fd)
            finally:
                os.close(fd)  # the probe's lock goes with it
        self._refuse_earlier_results()

    # --- checks and the lock ----------------------------------------------------------------------------
    def _refuse_earlier_results(self) -> None:
        if not self.overwrite and self.root.is_dir() and any(self.root.iterdir()):
            raise UserError(f"output folder {self.given} holds earlier results: choose another --out, or pass "
                            "--overwrite to replace it")

    def _try_lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(self.given) from None

    def _lock(self) -> None:
        """Creates the folder (and missing parents) if needed and holds its lock, on the folder the path
        names now: a run that just swapped its own folder in leaves another inode there."""
        for _ in range(5):
            missing = [p for p in [self.root, *self.root.parents] if not p.exists()]
            for folder in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    folder.mkdir()
                    self._created.append(folder)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._try_lock(fd)
                held, named = os.fstat(fd), os.stat(self.root)
            except BaseException:
                os.close(fd)
                raise
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                self._fd = fd
                return
            os.close(fd)
        raise _busy(self.given)

    def _sweep(self) -> None:
        """Staging folders of runs that were killed outright (SIGKILL, power loss): with the lock held, no
        live run owns one."""
        pattern = glob.escape(str(self.root.parent / STAGING.format(name=self.root.name))) + "*"
        for stale in glob.glob(pattern):
            log.info("removing %s (left by a killed run)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    # --- writing --------------------------------------------------------------------------------------
    def path(self, relative: str | Path) -> Path:
        """Where to write ``relative`` (its folders created)."""
        target = self._inside(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def folder(self, relative: str | Path) -> Path:
        """A folder for another writer (e.g. TensorBoard)."""
        target = self._inside(relative)
        target.mkdir(parents=True, exist_ok=True)
        return target

    def write_json(self, relative: str | Path, obj) -> Path:
        path = self.path(relative)
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        return path

    def _inside(self, relative: str | Path) -> Path:
        if self.staging is None:
            raise RuntimeError("OutputFolder is written inside its `with` block only")
        return self.staging / relative

    # --- the run --------------------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        try:
            self._lock()
            self._refuse_earlier_results()  # a run that ended meanwhile may have filled it
            self._sweep()
            self.staging = self.root.parent / (STAGING.format(name=self.root.name) + str(os.getpid()))
            self.staging.mkdir()
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None
        try:
            if not failed:
                self._publish()
        except BaseException:
            failed = True
            raise
        finally:
            self._release(failed)

    def _publish(self) -> None:
        root, staging = self.root, self.staging
        if not root.is_dir() or not any(root.iterdir()):
            os.rename(staging, root)  # over an empty folder (or none): one atomic step
        elif not self.overwrite:  # someone else's files appeared: keep theirs and ours
            kept, self.staging = staging, None
            raise UserError(f"output folder {self.given} was filled by another program during the run; this "
                            f"run's results are in {kept}")
        elif _exchange(staging, root):
            shutil.rmtree(staging)  # the old folder, now under the staging name
        else:
            old = root.parent / (_REPLACED.format(name=root.name) + str(os.getpid()))
            os.rename(root, old)
            try:
                os.rename(staging, root)
            except BaseException:
                os.rename(old, root)
                raise
            shutil.rmtree(old)
        self.staging = None
        _fsync_dir(root.parent)

    def _release(self, failed: bool) -> None:
        if failed and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        if failed and self._fd is not None:  # (without the lock, another run may be using them)
            for folder in reversed(self._created):  # empty folders this run made, innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._created = []
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

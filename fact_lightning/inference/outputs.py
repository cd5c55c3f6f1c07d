"""Reading a command's input images and writing its output folder, with errors that name the file.

An :class:`OutputFolder` is checked before any work (a run must not load every model and then find it
cannot write), is written file by file, and, when the run fails, loses what that run wrote: no partial
output is left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


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


class OutputFolder:
    """The folder a command writes to: checked writable on creation; on failure, emptied of this run's files.

    Use as a context manager: an exception inside removes every file written through :meth:`path` and
    every folder this run created (with what other writers put there), then propagates.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        _check_writable(self.root)
        self._files: list[Path] = []
        self._dirs: list[Path] = []

    def _make(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._dirs.append(folder)

    def path(self, relative: str | Path) -> Path:
        """Where to write ``relative`` (its folders created, the file recorded as this run's)."""
        target = self.root / relative
        self._make(target.parent)
        self._files.append(target)
        return target

    def folder(self, relative: str | Path) -> Path:
        """A folder for another writer (e.g. TensorBoard); removed with its contents on failure if this
        run created it."""
        target = self.root / relative
        self._make(target)
        return target

    def write_json(self, relative: str | Path, obj) -> Path:
        path = self.path(relative)
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        return path

    def discard(self) -> None:
        """Removes what this run wrote: its files, then the folders it created."""
        for path in self._files:
            path.unlink(missing_ok=True)
        for folder in reversed(self._dirs):
            shutil.rmtree(folder, ignore_errors=True)
        self._files, self._dirs = [], []

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

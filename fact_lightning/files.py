"""Safe file writes and content hashes: a file is either its old self or its complete new self."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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

"""Safe file writes and content hashes: a file is either its old self or its complete new self."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it and swap it in with os.replace."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary file beside ``path`` (same filesystem), fsync it and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

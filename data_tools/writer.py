"""Shard writing: webdataset tar written under a temporary name, renamed when complete.

Tar members carry a fixed mtime, owner and mode, so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from data_tools.records import ImageRecord
from fact_lightning.data import schema

TAR_MTIME = 0.0
TMP_SUFFIX = ".tmp"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def group_sample(key: str, identity: str, group_index: int, records: list[ImageRecord],
                 tokens: list[np.ndarray]) -> dict:
    """One webdataset sample (all values bytes) for an identity group; see fact_lightning.data.schema."""
    sample = {"__key__": key}
    for i, (rec, tok) in enumerate(zip(records, tokens)):
        sample[schema.image_key(i, schema.CROP)] = rec.crop_jpg
        sample[schema.image_key(i, schema.MASK)] = rec.mask_png
        sample[schema.image_key(i, schema.FACE)] = rec.face_png
        sample[schema.image_key(i, schema.TOKENS)] = npy_bytes(tok.astype(np.float16))
        sample[schema.image_key(i, schema.META)] = json_bytes(rec.meta)
    sample[schema.GROUP] = json_bytes({
        "format_version": schema.FORMAT_VERSION,
        "identity": identity,
        "group_index": group_index,
        "num_images": len(records),
        "sources": [r.source for r in records],
    })
    return sample


class AtomicShardWriter:
    """Context manager writing samples to ``path + '.tmp'``; on a clean exit it fsyncs and renames the file
    to ``path``; on an exception it removes the temporary file. ``sha256`` is set after a clean exit."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.count = 0
        self.sha256: str | None = None

    def __enter__(self) -> AtomicShardWriter:
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user="fact", group="fact")
        return self

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        self.sha256 = sha256_path(self.tmp)
        os.replace(self.tmp, self.path)


def sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()

"""Paths and helpers shared by the data_tools tests (a uniquely named module: tests/ is not a package)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.build import BuildOptions
from fact_lightning.data import shards

FACES = Path(__file__).resolve().parents[1] / "fixtures" / "faces"
RAW = FACES / "raw"
EDGE = FACES / "edge"
FACE_PHOTO = RAW / "df_1" / "img5.jpg"  # a clear frontal face, 330x512


def build_opts(src: Path, out: Path, **kw) -> BuildOptions:
    kw.setdefault("encoder", "tiny")
    kw.setdefault("random_encoder", True)
    return BuildOptions(src=src, out=out, **kw)


def rgb_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The command failed with exit 2 and exactly one `error:` line, no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def rewrite_shard(root: Path, index: int, change: Callable[[dict], None]) -> None:
    """Rewrites one shard with ``change(sample)`` applied to each raw sample and records its new hash in the
    stats and the manifest, as a writer would: only the content is bad."""
    path = root / shards.shard_name(index)
    samples = list(shards.iter_raw_samples(path))
    for sample in samples:
        change(sample)
    with shards.ShardWriter(path) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
    shards.write_stats(root, index, {**shards.read_stats(root, index), "sha256": writer.sha256,
                                     "tar_bytes": writer.tar_bytes})
    manifest = shards.read_manifest(root)
    manifest["shards"][[s["name"] for s in manifest["shards"]].index(path.name)]["sha256"] = writer.sha256
    shards.write_manifest(root, manifest)

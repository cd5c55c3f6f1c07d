"""Paths and helpers shared by the data_tools tests (a uniquely named module: tests/ is not a package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.build import BuildOptions

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

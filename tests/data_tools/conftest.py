"""Shared fixtures for data_tools tests: one built dataset, a copy of the raw photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_tools.build import run_build
from dt_helpers import RAW, build_opts


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """The fixture photos built once: small shards and groups of at most 2 to exercise splitting."""
    out = tmp_path_factory.mktemp("built")
    manifest = run_build(build_opts(RAW, out, images_per_shard=4, max_per_group=2))
    return out, manifest


@pytest.fixture
def raw_copy(tmp_path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(RAW, dst)
    return dst

"""Shared fixtures: tiny seeded SD1.5-topology components on CPU, the fixture photos, one face detector."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

# One compute thread per test process, inherited by the commands the tests start. The suite runs one xdist
# worker per core and many tests start subprocesses: with torch's default of one OpenMP thread per core, the
# threads outnumber the cores and spin-wait on each other (measured: a tiny UNet forward took 2-5 s instead
# of 0.1 s under that load). Set before torch is imported, so its thread pool starts at this size.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # in case a plugin imported torch before the lines above ran

from fact_lightning.models.resampler import TINY_RESAMPLER, ResamplerConfig
from fact_lightning.tiny import tiny_base_model

TINY_TOKEN_DIM = 64  # the tiny TransFace's token width
FACES = Path(__file__).parent / "fixtures" / "faces" / "raw"  # real photos, one folder per identity


def photo(identity_name: str, index: int = 0) -> np.ndarray:
    """The ``index``-th fixture photo of an identity, decoded as fact-data decodes it (RGB uint8)."""
    from fact_lightning.faces.decode import decode_image

    path = sorted((FACES / identity_name).iterdir())[index]
    return decode_image(path.read_bytes()).image


@pytest.fixture(scope="session")
def detector():
    """One mediapipe face detector for the whole session (its models load once)."""
    from fact_lightning.faces.detectors import create_detector

    det = create_detector("mediapipe")
    yield det
    det.close()


def tiny_projection_config(output_dim: int = 32) -> ResamplerConfig:
    return dataclasses.replace(TINY_RESAMPLER, output_dim=output_dim)


@pytest.fixture(scope="session")
def _tiny_base_session():
    return tiny_base_model(seed=0)


@pytest.fixture
def tiny_base(_tiny_base_session):
    """A fresh copy per test: tests attach adapters and may change weights."""
    return copy.deepcopy(_tiny_base_session)


@pytest.fixture
def tiny_unet(tiny_base):
    return tiny_base.unet


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
    }


def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (make test), the tests that use a module-scoped fixture (a training run, a
    TensorBoard server, a built dataset) run on one xdist worker, so that fixture is built once; the others
    spread over the workers one by one.

    The modules with ``slow`` tests are handed out first: xdist hands out tests in collection order, and a long
    test taken last leaves the other worker idle until it ends (longest first keeps both busy to the end). Whole
    modules move, in their own order, so that a module-scoped fixture is still built once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)  # pytest's record of the fixtures a test resolved
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope == "module" for chain in defs for d in chain):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)  # stable: the order within stays


def unshare_mount_works(mnt: Path) -> bool:
    """Whether a tmpfs can be mounted on ``mnt`` in a private mount namespace (the full-disk tests' real disk)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


NEEDS_MOUNT_NS = "needs unshare -m and mount (root in a mount namespace), as the developers' machines and CI have"

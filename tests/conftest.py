"""Shared fixtures: tiny seeded SD1.5-topology components on CPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fact_lightning.models.base import tiny_base_model
from fact_lightning.models.resampler import TINY_RESAMPLER, ResamplerConfig

TINY_TOKEN_DIM = 64  # the tiny TransFace's token width


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

"""Training fixtures: synthetic identity-grouped shards (64 px crops, tiny-encoder tokens)."""

from __future__ import annotations

import pytest

from fact_lightning.experiments.synthetic import write_synthetic_shards

RESOLUTION = 64


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, identities=4, images_per_identity=3, groups_per_shard=2, resolution=RESOLUTION)
    return root


@pytest.fixture(scope="session")
def two_image_shards(tmp_path_factory):
    """One identity with two images: every batch of 2 is the same two samples (fast overfitting checks)."""
    root = tmp_path_factory.mktemp("two_images")
    write_synthetic_shards(root, identities=1, images_per_identity=2, groups_per_shard=1, resolution=RESOLUTION)
    return root

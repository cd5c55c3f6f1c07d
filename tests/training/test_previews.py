"""Previews: fixed identities/prompts/seeds, with and without the adapter, as PNG files, logger images and an identity curve."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from PIL import Image

from fact_lightning.callbacks.preview_grid import labelled_grid
from fact_lightning.callbacks.previews import Previews, read_preview_identities
from fact_lightning.faces.identity import face_similarity, reference_embedding
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.data.shards import MANIFEST_NAME
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.module import FactModule
from tests.conftest import photo

RESOLUTION = 64


@pytest.fixture(scope="module")
def random_encoder_shards(tmp_path_factory):
    """Synthetic shards whose manifest says they were encoded with the seeded random tiny TransFace."""
    root = tmp_path_factory.mktemp("preview_shards")
    manifest = write_synthetic_shards(root, identities=3, images_per_identity=2, groups_per_shard=2, resolution=RESOLUTION)
    manifest["encoder"].update(variant="tiny", random=True, weights=None)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


class ImageRecorder(Logger):
    """A non-TensorBoard logger with a ``log_image`` method (as WandbLogger has)."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, int, list[np.ndarray]]] = []
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, images))


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_previews_over_a_run(random_encoder_shards, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na photo of {subject}\n\n{subject} on a beach\n")
    previews = Previews(every_n_steps=2, identities=["id2", "id0"], prompts=str(prompts), subject="a person",
                        seeds=[3], inference_steps=2)
    recorder = ImageRecorder()
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    pl.seed_everything(0)
    module = FactModule(TinyBase(), TINY_RESAMPLER, optimizer=partial(torch.optim.Adam, lr=5e-2), fair_weight=0.01)
    data = FactDataModule(str(random_encoder_shards), batch_size=2, resolution=RESOLUTION, token_dim=64,
                          encoder="tiny", streaming=False, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=[tensorboard, recorder], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         default_root_dir=str(tmp_path), callbacks=[previews])
    trainer.fit(module, data)

    root = tmp_path / "tb" / "version_0" / "previews"  # trainer.log_dir / previews
    assert sorted(p.name for p in root.iterdir()) == ["previews.json", "step-000000", "step-000002", "step-000004"]
    settings = json.loads((root / "previews.json").read_text())
    assert [i["name"] for i in settings["identities"]] == ["id2", "id0"]  # the order asked for
    assert settings["prompts"] == ["a photo of a person", "a person on a beach"]
    expected = {f"{who}_p{p:02d}_s3_{kind}.png" for who in ("id2", "id0") for p in (0, 1) for kind in ("adapter", "base")}
    for step in (0, 2, 4):
        names = {p.name for p in (root / f"step-{step:06d}").iterdir()}
        assert names == expected | {"grid.png", "scores.json"}, step
        grid = read_png(root / f"step-{step:06d}" / "grid.png")
        assert grid.shape[0] > 4 * RESOLUTION and grid.shape[1] > 4 * RESOLUTION  # 4 rows x 4 columns + labels

    def image(step, name):
        return read_png(root / f"step-{step:06d}" / name).astype(int)

    for stem in ("id2_p00_s3", "id0_p01_s3"):
        assert image(0, f"{stem}_adapter.png").shape == (RESOLUTION, RESOLUTION, 3)
        # Fresh gates are 0: before training the adapter leaves the base model's image unchanged.
        assert np.array_equal(image(0, f"{stem}_adapter.png"), image(0, f"{stem}_base.png"))
        # The base model is frozen and the seed fixed: its previews never change; the adapter's do.
        assert np.array_equal(image(4, f"{stem}_base.png"), image(0, f"{stem}_base.png"))
        assert np.abs(image(4, f"{stem}_adapter.png") - image(4, f"{stem}_base.png")).max() > 0
    # Other prompts and identities give other images.
    assert not np.array_equal(image(0, "id2_p00_s3_base.png"), image(0, "id2_p01_s3_base.png"))
    assert not np.array_equal(image(4, "id2_p00_s3_adapter.png"), image(4, "id0_p00_s3_adapter.png"))

    # Random tiny models draw no faces: detect rate 0 and the similarity missing (null; NaN to the loggers).
    scores = json.loads((root / "step-000002" / "scores.json").read_text())
    assert scores["preview/face_detect_rate"] == 0.0 and scores["preview/face_similarity"] is None
    assert len(scores["previews"]) == 4 and all(s["adapter"] is None for s in scores["previews"])

    # Every logger with log_image got one labelled grid per identity at every preview step.
    got = {(key, step) for key, step, _ in recorder.images}
    assert got == {(f"preview/{who}", step) for who in ("id2", "id0") for step in (0, 2, 4)}
    assert all(len(images) == 1 and images[0].dtype == np.uint8 and images[0].ndim == 3 for *_, images in recorder.images)
    detect = [(step, m["preview/face_detect_rate"]) for step, m in recorder.metrics if "preview/face_detect_rate" in m]
    assert detect == [(0, 0.0), (2, 0.0), (4, 0.0)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"preview/id2", "preview/id0"} <= set(tags["images"])
    assert [e.step for e in events.Images("preview/id0")] == [0, 2, 4]
    assert [(e.step, e.value) for e in events.Scalars("preview/face_detect_rate")] == [(0, 0.0), (2, 0.0), (4, 0.0)]
    # The similarity's card is there, its points NaN (TensorBoard draws them as triangles): missing, visibly.
    similarity = events.Scalars("preview/face_similarity")
    assert [e.step for e in similarity] == [0, 2, 4] and all(np.isnan(e.value) for e in similarity)


def test_default_identities_are_the_first_in_shard_order(random_encoder_shards):
    chosen = read_preview_identities(random_encoder_shards, count=2)
    assert [i.name for i in chosen] == ["id0", "id1"]
    assert [i.key for i in chosen] == ["000000_0000/00", "000000_0001/00"]
    data = FactDataModule(str(random_encoder_shards), batch_size=2, resolution=RESOLUTION, streaming=False, num_workers=0)
    data.setup("fit")
    samples = {s["key"]: s for s in data._train.samples}  # what training reads
    for identity in chosen:  # the first image's cached tokens, aligned face and crop
        sample = samples[identity.key]
        assert identity.tokens.shape == (144, 64)
        np.testing.assert_array_equal(identity.tokens.astype(np.float32), sample["tokens"].numpy())
        np.testing.assert_allclose(identity.face / 255.0, sample["face"].permute(1, 2, 0).numpy(), atol=1e-6)
        assert identity.crop.shape == (RESOLUTION, RESOLUTION, 3)
    assert read_preview_identities(random_encoder_shards, count=10)[-1].name == "id2"  # all there are
    with pytest.raises(ValueError, match="nobody"):
        read_preview_identities(random_encoder_shards, names=["id1", "nobody"])


def test_face_similarity_is_one_for_the_same_photo_and_lower_for_another_person(detector):
    from fact_lightning.faces.encoding import encode_faces
    from fact_lightning.faces.reference import LENIENT_POLICY, prepare_reference
    from fact_lightning.interop.official import load_encoder

    encoder, _ = load_encoder("tiny", None, allow_random=True)
    obama, biden = photo("fr_obama"), photo("fr_biden")
    tokens = encode_faces(encoder, prepare_reference(obama, detector, LENIENT_POLICY).face[None])[0]
    reference = reference_embedding(encoder, tokens)  # as the stored shard tokens give it
    assert np.linalg.norm(reference) == pytest.approx(1.0, abs=1e-5)
    assert face_similarity(obama, reference, encoder, detector) == pytest.approx(1.0, abs=1e-3)
    assert face_similarity(biden, reference, encoder, detector) < 0.9
    assert face_similarity(np.full((128, 128, 3), 127, np.uint8), reference, encoder, detector) is None


def test_labelled_grid_places_tiles_below_and_right_of_the_labels():
    red, blue = np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    grid = labelled_grid([[red, blue], [blue, red]], ["a p00 s0", "b p00 s0"], ["adapter", "base"], "step 2")
    h, w, _ = grid.shape
    assert (h - 64, w - 64) > (0, 0)
    np.testing.assert_array_equal(grid[-1, -1], [255, 0, 0])  # bottom-right: red
    np.testing.assert_array_equal(grid[-1, w - 33], [0, 0, 255])  # bottom-left tile: blue (resized to 32)
    assert (grid[: h - 64] < 128).any()  # the title and column labels are drawn


def test_rejects_settings_that_preview_nothing():
    with pytest.raises(ValueError):
        Previews(seeds=[])
    with pytest.raises(ValueError):
        Previews(identities=[])
    with pytest.raises(ValueError):
        Previews(every_n_steps=-1)


FSDP_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {{data_parallel_size: 2, tensor_parallel_size: 1}}
  max_steps: 2
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  callbacks:
    - class_path: fact_lightning.callbacks.previews.Previews
      init_args: {{every_n_steps: 2, num_identities: 2, inference_steps: 2, dirpath: null}}
model:
  base: {{class_path: fact_lightning.training.base_spec.TinyBase}}
  projection: {{token_dim: 64, dim: 64, depth: 2, heads: 2, dim_head: 64, output_dim: 32}}
  optimizer: {{class_path: torch.optim.Adam, init_args: {{lr: 0.05}}}}
data: {{root: {shards}, resolution: 64, batch_size: 2, encoder: tiny, streaming: false, shuffle: false, num_workers: 0}}
"""


@pytest.mark.slow
def test_previews_under_fsdp2_on_two_processes(random_encoder_shards, tmp_path):
    """Every rank generates (the sharded adapter gathers its weights), rank 0 writes; nothing deadlocks."""
    config = tmp_path / "config.yaml"
    config.write_text(FSDP_CONFIG.format(out=tmp_path / "run", shards=random_encoder_shards))
    result = subprocess.run([sys.executable, "-m", "fact_lightning.cli", "fit", "--config", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    folders = sorted(p.parent.name for p in (tmp_path / "run").rglob("previews/step-*/grid.png"))
    assert folders == ["step-000000", "step-000002"]
    step2 = next((tmp_path / "run").rglob("previews/step-000002"))
    assert not np.array_equal(read_png(step2 / "id0_p00_s0_adapter.png"), read_png(step2 / "id0_p00_s0_base.png"))

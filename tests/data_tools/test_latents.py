"""Cached VAE latents: `fact-data build --vae`, `fact-data add-latents`, inspect, the training reader's checks."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import latents as latents_mod
from data_tools.build import run_build
from data_tools.dataset import inspect_dataset
from data_tools.latents import run_add_latents
from data_tools.options import AddLatentsOptions, LatentOptions
from data_tools.records import RecordOptions
from dt_helpers import RAW, build_opts
from fact_lightning.data import schema, shards
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.data.pipeline import ToTensors
from fact_lightning.tiny import tiny_base_model
from fact_lightning.training.base_spec import PretrainedBase, TinyBase

FACT_DATA = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "fact-data"
RES = 64
BUILD_ARGS = ["--encoder", "tiny", "--random-encoder", "--resolution", str(RES), "--images-per-shard", "4",
              "--max-per-group", "2"]


def _tars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.tar"))}


def _add(root: Path, **kw) -> dict:
    return run_add_latents(root, AddLatentsOptions(latents=LatentOptions(vae="tiny"), **kw))


@pytest.fixture(scope="module")
def with_vae(tmp_path_factory) -> Path:
    """Built once through the real console script, with the tiny VAE's latents."""
    out = tmp_path_factory.mktemp("lat") / "with"
    env = {**os.environ, "GLOG_minloglevel": "2"}
    done = subprocess.run([str(FACT_DATA), "build", "--src", str(RAW), "--out", str(out), *BUILD_ARGS, "--vae", "tiny"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "latents: VAE tiny(seed=0)" in done.stdout.replace("\n", " ")
    return out


@pytest.fixture(scope="module")
def without_vae(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lat") / "without"
    run_build(build_opts(RAW, out, record=RecordOptions(resolution=RES), images_per_shard=4, max_per_group=2))
    return out


@pytest.fixture
def plain(without_vae, tmp_path) -> Path:
    dst = tmp_path / "plain"
    shutil.copytree(without_vae, dst)
    return dst


def test_manifest_and_inspect_name_the_vae(with_vae):
    manifest = shards.read_manifest(with_vae)
    vae = manifest["vae"]
    assert vae["name"] == "tiny(seed=0)" and vae["seed"] == 0 and vae["latent_dtype"] == "float16"
    assert vae["latent_shape"] == [2, 4, RES // 8, RES // 8]
    assert vae["scaling_factor"] == pytest.approx(0.18215) and len(vae["weights_sha256"]) == 64
    assert all(shards.read_stats(with_vae, i)["vae"] == vae for i in range(len(manifest["shards"])))
    assert inspect_dataset(with_vae).ok
    shown = subprocess.run([str(FACT_DATA), "inspect", str(with_vae)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "latents: VAE tiny(seed=0) (seed 0; weights sha256 " + vae["weights_sha256"] in text
    assert "not applied" in text


def test_pipeline_yields_the_tiny_vae_latents_of_the_stored_crops(with_vae):
    data = FactDataModule(str(with_vae), batch_size=2, token_dim=64, encoder="tiny", vae=TinyBase().describe_vae(),
                          streaming=False, num_workers=0)
    data.setup("fit")
    samples = data._train.samples
    assert len(samples) == shards.read_manifest(with_vae)["counts"]["images"]
    vae = tiny_base_model(seed=0).vae
    pixels = torch.stack([s["pixels"] for s in samples])
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    mean = torch.stack([s["latent_mean"] for s in samples])
    std = torch.stack([s["latent_std"] for s in samples])
    assert mean.dtype == torch.float32 and mean.shape == (len(samples), 4, RES // 8, RES // 8)
    torch.testing.assert_close(mean, dist.mean.half().float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(std, dist.std.half().float(), atol=2e-3, rtol=2e-3)
    assert not torch.equal(mean[0], mean[1])


def test_add_latents_gives_the_bytes_of_a_build_with_them(with_vae, plain):
    before = shards.read_manifest(plain)
    assert before["vae"] is None and inspect_dataset(plain).ok
    manifest = _add(plain)
    assert _tars(plain) == _tars(with_vae) and len(_tars(plain)) == 3
    assert manifest["vae"] == shards.read_manifest(with_vae)["vae"]
    assert manifest["shards"] == shards.read_manifest(with_vae)["shards"]
    assert shards.read_manifest(plain) == manifest and inspect_dataset(plain).ok
    again = _add(plain)  # nothing left to do
    assert again["resumed_shards"] == 3 and _tars(plain) == _tars(with_vae)
    # a build with the same VAE keeps every shard add-latents wrote
    rebuilt = run_build(build_opts(RAW, plain, record=RecordOptions(resolution=RES), images_per_shard=4,
                                   max_per_group=2, latents=LatentOptions(vae="tiny")))
    assert rebuilt["resumed_shards"] == 3 and _tars(plain) == _tars(with_vae)


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("where", ["before_rename", "after_rename"])
def test_interrupted_add_latents_resumes_to_identical_bytes(with_vae, plain, monkeypatch, where):
    real_install = latents_mod._install
    calls = {"n": 0}

    def install(staged, tar):
        calls["n"] += 1
        if where == "before_rename" and calls["n"] == 2:
            raise _Killed  # the second shard's new tar is written and pending in its stats
        real_install(staged, tar)
        if where == "after_rename" and calls["n"] == 2:
            raise _Killed  # the new tar is in place, its stats still describe the old one

    monkeypatch.setattr(latents_mod, "_install", install)
    with pytest.raises(_Killed):
        _add(plain)
    monkeypatch.setattr(latents_mod, "_install", real_install)
    assert list(plain.glob("*.tmp")) if where == "before_rename" else True
    assert shards.read_manifest(plain)["vae"] is None  # the manifest is rewritten last
    with pytest.raises(shards.ManifestError):  # a reader of the half-done folder is told
        shards.shard_urls(plain, shards.read_manifest(plain))
    done = _add(plain)
    assert done["resumed_shards"] == (1 if where == "before_rename" else 2)
    assert _tars(plain) == _tars(with_vae)
    assert not list(plain.glob("*.tmp")) and inspect_dataset(plain).ok
    assert shards.read_manifest(plain)["shards"] == shards.read_manifest(with_vae)["shards"]


def test_a_damaged_shard_is_not_blessed(plain):
    tar = plain / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(Exception, match="shard-000001.tar does not match its stats"):
        _add(plain)


def test_vae_mismatch_is_one_clear_error(with_vae):
    def data(**kw):
        return FactDataModule(str(with_vae), token_dim=64, encoder="tiny", streaming=False, num_workers=0, **kw)

    with pytest.raises(shards.ManifestError, match=r"latents of the VAE 'tiny\(seed=0\)', the model's VAE is "
                                                   r"'tiny\(seed=1\)'") as err:
        data(vae=TinyBase(seed=1).describe_vae()).check()
    assert "\n" not in str(err.value) and "fact-data add-latents" in str(err.value)
    with pytest.raises(shards.ManifestError, match="runwayml/stable-diffusion-v1-5"):
        data(vae=PretrainedBase("runwayml/stable-diffusion-v1-5").describe_vae()).check()
    with pytest.raises(shards.ManifestError, match="model's VAE is unknown"):
        data().check()
    with pytest.raises(shards.ManifestError, match="for 64 px crops, training reads 128 px"):
        data(vae="tiny(seed=0)", resolution=128, resize=True).check()
    off = data(cached_latents=False)  # the escape hatch: the model's VAE encodes the crops
    off.setup("fit")
    assert "latent_mean" not in off._train.samples[0] and "pixels" in off._train.samples[0]


def test_vae_names_of_a_model_and_its_vae_folder_match(tmp_path):
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    assert PretrainedBase(str(tmp_path / "sd")).describe_vae() == str(tmp_path / "sd")
    assert shards.same_vae(str(tmp_path / "sd" / "vae"), str(tmp_path / "sd"))
    assert PretrainedBase("a/b", revision="r1").describe_vae() == "a/b@r1"
    assert not shards.same_vae("a/b@r1", "a/b")


def test_mixed_shards_are_an_error_naming_the_shard(with_vae, plain):
    shutil.copy(with_vae / "shard-000001.tar", plain / "shard-000001.tar")
    shutil.copy(with_vae / "shard-000001.stats.json", plain / "shard-000001.stats.json")
    manifest = shards.read_manifest(plain)
    manifest["shards"][1]["sha256"] = shards.read_stats(plain, 1)["sha256"]
    shards.write_manifest(plain, manifest)
    with pytest.raises(shards.ManifestError, match="shard-000001.tar"):
        shards.shard_urls(plain, manifest)
    report = inspect_dataset(plain)
    bad = [s for s in report.shards if not s.ok]
    assert [s.name for s in bad] == ["shard-000001.tar"] and "manifest names no VAE" in bad[0].error


def _decoded_sample(root: Path, latent) -> dict:
    sample = next(shards.iter_raw_samples(root / "shard-000000.tar"))
    image = {schema.CROP: Image.open(io.BytesIO(sample["00.crop.jpg"])),
             schema.MASK: Image.open(io.BytesIO(sample["00.mask.png"])),
             schema.FACE: Image.open(io.BytesIO(sample["00.face.png"])),
             schema.TOKENS: np.load(io.BytesIO(sample["00.tokens.npy"])), schema.META: {}}
    if latent is not None:
        image[schema.LATENT] = latent
    return {"key": "k/00", "__url__": str(root / "shard-000000.tar"), "image": image,
            "partner_tokens": image[schema.TOKENS], "shuffle_available": False}


def test_reader_refuses_latents_that_do_not_fit(without_vae):
    shape = (2, 4, RES // 8, RES // 8)
    good = np.zeros(shape, np.float16)
    assert set(ToTensors(RES, latent_shape=shape)(_decoded_sample(without_vae, good))) >= {"latent_mean", "latent_std"}
    with pytest.raises(shards.ManifestError, match=r"shard-000000.tar: image k/00 has cached latents"):
        ToTensors(RES)(_decoded_sample(without_vae, good))
    with pytest.raises(shards.ManifestError, match="shard-000000.tar: image k/00 has no cached latents"):
        ToTensors(RES, latent_shape=shape)(_decoded_sample(without_vae, None))
    with pytest.raises(shards.ManifestError, match="do not fit the crop"):
        ToTensors(RES, latent_shape=(2, 4, 4, 4))(_decoded_sample(without_vae, np.zeros((2, 4, 4, 4), np.float16)))


def test_a_single_file_vae_that_is_no_checkpoint_is_one_error_line(plain, tmp_path):
    """--vae also takes a community single-file checkpoint (its VAE, named as the single-file base names it); a
    file that is none is refused from its header, in one line, and the shards are left as they were."""
    before = _tars(plain)
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"x" * 100)
    done = subprocess.run([str(FACT_DATA), "add-latents", str(plain), "--vae", str(bogus)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bogus) in lines[0] and "(--vae)" in lines[0]
    assert _tars(plain) == before

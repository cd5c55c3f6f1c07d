import pytest
import torch

from fact_lightning.models.base import load_base_model
from fact_lightning.weights import MissingWeightsError
from fact_lightning.models.tokenizer import clip_tokenizer_from_open_clip


def test_tokenizer_is_sd15s():
    tokenizer = clip_tokenizer_from_open_clip()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert tokenizer.pad_token_id == 49407


def test_tiny_components_have_the_sd15_geometry(tiny_base):
    assert tiny_base.unet.config.block_out_channels == (32, 64, 64, 64)
    assert 2 ** (len(tiny_base.vae.config.block_out_channels) - 1) == 8  # the VAE downsamples 8x as SD1.5's
    assert all(not p.requires_grad for m in tiny_base.frozen_modules() for p in m.parameters())
    with torch.no_grad():
        latents = tiny_base.vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)


def test_saved_folder_loads_back_through_from_pretrained(tiny_base, tmp_path):
    tiny_base.save_pretrained(tmp_path / "sd")
    loaded = load_base_model(tmp_path / "sd", local_files_only=True)
    for a, b in zip(tiny_base.frozen_modules(), loaded.frozen_modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.tokenizer("a photo of").input_ids == tiny_base.tokenizer("a photo of").input_ids
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_missing_weights_are_named(tiny_base, tmp_path):
    tiny_base.save_pretrained(tmp_path / "sd")
    import shutil

    shutil.rmtree(tmp_path / "sd" / "vae")
    with pytest.raises(MissingWeightsError, match="missing vae/"):
        load_base_model(tmp_path / "sd")
    (tmp_path / "sd" / "vae").mkdir()
    with pytest.raises(MissingWeightsError, match="could not load the base model"):
        load_base_model(tmp_path / "sd", local_files_only=True)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_base_model(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="hub id"):
        load_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5", local_files_only=True)

"""Single-file SDXL bases: the original SGM key layout (sd_xl_base_1.0.safetensors and the community fine-tunes)
read with diffusers' single-file conversion and local configs. The files are written here: the tiny SDXL stand-in
(and, on the meta device, a full-size SDXL) converted from diffusers' layout to SGM's by this file's own key map,
the UNet and VAE by the SD1.5 tests' map (the same original layout), the two text encoders by the map below."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fact_lightning.models.sdxl_base import SDXLBaseModel, load_sdxl_base_model
from fact_lightning.models.single_file import SingleFileError, file_base_type, single_file_problems
from fact_lightning.models.single_file_sdxl import (SDXL_CONFIG, convert_sdxl, sdxl_component_mismatches,
                                                    sdxl_single_file_problems)
from fact_lightning.models.single_file_vae import load_single_file_vae
from fact_lightning.tiny_sdxl import tiny_sdxl_base_model
from fact_lightning.training.base_spec import PretrainedBase, PretrainedSDXLBase
from tests.models.test_single_file import ldm_unet_key, ldm_vae_key, same_state, write_single_file

# -- diffusers -> SGM keys for the second text encoder (OpenCLIP bigG in open_clip's own layout) -------------------
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias"}


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in open_clip's layout: q, k and v fused into ``in_proj``, the
    projection stored as the (width, dim) matrix that multiplies from the right."""
    out, fused = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            assert m, key
            layer, name, kind = m.groups()
            q_k_v = re.fullmatch(r"self_attn\.(q|k|v)_proj", name)
            if q_k_v:
                fused.setdefault((layer, kind), {})[q_k_v.group(1)] = value
            else:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[name]}.{kind}"] = value
    for (layer, kind), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_sgm(base: SDXLBaseModel) -> dict[str, torch.Tensor]:
    """A diffusers SDXL base (UNet, VAE, both text encoders) as one state dict in the original SGM layout."""
    out = {f"model.diffusion_model.{ldm_unet_key(k, base.unet.config)}": v for k, v in base.unet.state_dict().items()
           if not k.startswith("add_embedding.")}
    for k, v in base.unet.state_dict().items():  # SDXL's text-time embedding: the original "label_emb"
        if k.startswith("add_embedding."):
            out[f"model.diffusion_model.label_emb.0.{'0' if '.linear_1.' in k else '2'}.{k.rsplit('.', 1)[1]}"] = v
    for key, value in base.vae.state_dict().items():
        ldm, to_conv = ldm_vae_key(key, base.vae.config)
        out[f"first_stage_model.{ldm}"] = value[:, :, None, None] if to_conv else value
    for key, value in base.text_encoder.state_dict().items():
        out[f"conditioner.embedders.0.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    for key, value in open_clip_state(base.text_encoder_2.state_dict()).items():
        out[f"conditioner.embedders.1.model.{key}"] = value
    out["conditioner.embedders.1.model.logit_scale"] = torch.ones(())  # open_clip keeps it; no encoder uses it
    return out


def write_sdxl_configs(base: SDXLBaseModel, folder: Path) -> Path:
    """The component configs of ``base`` as a diffusers folder (no weights, no tokenizers): what ``config`` takes."""
    base.unet.save_config(folder / "unet")
    base.vae.save_config(folder / "vae")
    base.text_encoder.config.save_pretrained(folder / "text_encoder")
    base.text_encoder_2.config.save_pretrained(folder / "text_encoder_2")
    base.noise_scheduler.save_config(folder / "scheduler")
    return folder


def write_sdxl_single_file(base: SDXLBaseModel, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in to_sgm(base).items()}, path)
    return path


@pytest.fixture(scope="module")
def tiny_xl():
    return tiny_sdxl_base_model(seed=0)


@pytest.fixture(scope="module")
def xl_file(tiny_xl, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sdxl_file")
    return write_sdxl_single_file(tiny_xl, root / "tiny-sdxl.safetensors"), write_sdxl_configs(tiny_xl, root / "cfg")


# -- tests ----------------------------------------------------------------------------------------------------
def test_a_tiny_sdxl_single_file_loads_to_the_same_weights(tiny_xl, xl_file):
    path, config = xl_file
    spec = PretrainedSDXLBase(str(path), config=str(config))
    assert spec.weight_problems() == []
    loaded = spec.build()
    for ours, theirs in zip(loaded.frozen_modules(), tiny_xl.frozen_modules(), strict=True):
        assert type(ours) is type(theirs)
        assert same_state(ours, theirs), type(ours).__name__
        assert not any(p.requires_grad for p in ours.parameters())
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"  # SDXL's pair
    assert loaded.tokenizer(["a photo of"]).input_ids[0][1:4] == [320, 1125, 539]
    ours, theirs = loaded.encode_prompt(["a photo of a person", ""]), tiny_xl.encode_prompt(["a photo of a person", ""])
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.pooled, theirs.pooled)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    t = torch.tensor([10])
    prompts = [(base, base.encode_prompt("a photo of a person")) for base in (loaded, tiny_xl)]
    outputs = [base.unet(latents, t, prompt.tokens, added_cond_kwargs=prompt.added_cond_kwargs(time_ids)).sample
               for base, prompt in prompts]
    assert torch.equal(*outputs)
    assert type(loaded.noise_scheduler).__name__ == "DDPMScheduler"  # training's noise, over the file's betas
    assert PretrainedSDXLBase(str(path), config=str(config), frozen_dtype="bfloat16").build().unet.dtype \
        == torch.bfloat16


def test_the_file_layout_tells_sdxl_from_sd15(tiny_base, xl_file, tmp_path):
    assert file_base_type(xl_file[0]) == "sdxl"
    assert file_base_type(write_single_file(tiny_base, tmp_path / "sd15.safetensors")) == "sd15"
    assert file_base_type(tmp_path / "missing.safetensors") is None


def full_size_sgm_checkpoint() -> dict[str, torch.Tensor]:
    """A full-size SDXL base in the SGM layout on the meta device, from the packaged configs: keys and shapes only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        full = SDXLBaseModel(
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG / "unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIG / "vae")),
            CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder")),
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder_2")),
            None, None, None)
        return to_sgm(full)


def test_the_packaged_sdxl_configs_take_every_key_and_shape_of_a_full_size_checkpoint():
    """A full-size SDXL base (built on the meta device from the packaged configs, written in the SGM layout by this
    file's key map) converts to exactly the weights and shapes those configs need. Keys as sd_xl_base_1.0's
    released file names them anchor the layout; the parameter counts are SDXL base 1.0's."""
    checkpoint = full_size_sgm_checkpoint()
    released = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": [640, 2048],
                "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight": [1280, 2048],
                "model.diffusion_model.input_blocks.7.1.proj_in.weight": [1280, 1280],
                "model.diffusion_model.label_emb.0.0.weight": [1280, 2816],
                "model.diffusion_model.input_blocks.6.0.op.weight": [640, 640, 3, 3],
                "model.diffusion_model.output_blocks.2.2.conv.weight": [1280, 1280, 3, 3],
                "model.diffusion_model.output_blocks.6.0.skip_connection.weight": [320, 960, 1, 1],
                "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
                "conditioner.embedders.1.model.positional_embedding": [77, 1280],
                "conditioner.embedders.1.model.text_projection": [1280, 1280],
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": [3840, 1280],
                "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": [5120, 1280]}
    for key, shape in released.items():
        assert list(checkpoint[key].shape) == shape, key
    assert sdxl_component_mismatches(checkpoint, SDXL_CONFIG) == []
    parts = convert_sdxl(checkpoint, SDXL_CONFIG)
    counts = {name: sum(v.numel() for v in part.values()) for name, part in parts.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    # every key but the 3 in_proj pairs' fusion and logit_scale maps one to one
    fused = sum(k.endswith(("in_proj_weight", "in_proj_bias")) for k in checkpoint)
    assert sum(len(p) for p in parts.values()) == len(checkpoint) - 1 + 2 * fused


def test_the_tiny_file_against_the_packaged_configs_names_what_differs(xl_file):
    path, _ = xl_file
    (problem,) = PretrainedSDXLBase(str(path)).weight_problems()
    assert problem.startswith(f"base model file {path} is not an SDXL checkpoint of the configs in {SDXL_CONFIG}: ")
    assert "weights of another shape" in problem and problem.endswith("(model.base.init_args.source)")
    assert "looks like" not in problem  # it is an SDXL file, of another size


def test_an_sd15_file_given_as_sdxl_and_an_sdxl_file_given_as_sd15_are_named(tiny_base, xl_file, tmp_path):
    sd15 = write_single_file(tiny_base, tmp_path / "sd15.safetensors")
    (problem,) = sdxl_single_file_problems(sd15, option="--base")
    assert problem == (f"base model file {sd15} is not an SDXL checkpoint (it looks like an SD1.5 base model: one "
                       "text encoder, under cond_stage_model.transformer.*): load it as SD1.5 (--base)")
    with pytest.raises(SingleFileError, match=re.escape("(it looks like an SD1.5 base model")):
        load_sdxl_base_model(sd15, config=xl_file[1])
    # With configs that describe it, an SDXL file would convert as SD1.5 too, losing its second text encoder.
    (problem,) = PretrainedBase(str(xl_file[0]), config=str(xl_file[1])).weight_problems()
    assert problem == (f"base model file {xl_file[0]} is not an SD1.5 checkpoint (it looks like an SDXL base "
                       "model: a second text encoder under conditioner.embedders.1.model.*): load it as SDXL "
                       "(model.base.init_args.source)")
    (problem,) = PretrainedBase(str(xl_file[0])).weight_problems()  # SD1.5's configs: shapes differ, and it is named
    assert "is not an SD1.5 checkpoint of the configs in" in problem and "(it looks like an SDXL base model)" in problem
    assert single_file_problems(sd15, xl_file[1]) != []  # SD1.5's check, with SDXL configs: the shapes differ


def test_unusable_files_and_config_folders_are_refused_before_loading(xl_file, tmp_path):
    path, config = xl_file
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pickle = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, pickle)
    expected = {truncated: "is truncated: its header describes", pickle: "is a pickle (a torch .ckpt/.pt)",
                tmp_path / "gone.safetensors": "does not exist"}
    for bad, fragment in expected.items():
        problems = PretrainedSDXLBase(str(bad), config=str(config)).weight_problems()
        assert len(problems) == 1 and fragment in problems[0], (bad, problems)
        with pytest.raises(SingleFileError, match=re.escape(fragment)):
            load_sdxl_base_model(bad, config=config)
    partial = tmp_path / "cfg"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "config.json").write_text((config / "unet" / "config.json").read_text())
    (problem,) = sdxl_single_file_problems(path, partial)
    assert problem == (f"SDXL base model config folder {partial} is missing vae/config.json, text_encoder/config.json,"
                       " scheduler/scheduler_config.json, text_encoder_2/config.json")
    folder = tmp_path / "sdxl-folder"
    tiny_sdxl_base_model(seed=0).save_pretrained(folder)
    (problem,) = PretrainedSDXLBase(str(folder), config=str(config)).weight_problems()
    assert "goes with a single-file source" in problem
    with pytest.raises(ValueError, match="goes with a single-file base"):
        load_sdxl_base_model(folder, config=config)


def test_the_vae_alone_loads_for_cached_latents_and_is_named_by_its_digest(tiny_xl, xl_file):
    name = PretrainedSDXLBase(str(xl_file[0])).describe_vae()
    assert re.fullmatch(r"tiny-sdxl\.safetensors@vae-sha256:[0-9a-f]{16}", name), name
    vae = load_single_file_vae(*xl_file)  # fact-data --vae FILE: configured as SDXL by the file's keys
    assert same_state(vae, tiny_xl.vae) and vae.config.scaling_factor == 0.13025
    with pytest.raises(SingleFileError, match="is not an SDXL checkpoint of the configs in"):
        load_single_file_vae(xl_file[0])  # the tiny file against the packaged SDXL configs


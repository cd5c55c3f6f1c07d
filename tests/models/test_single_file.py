"""Single-file SD1.5 bases: the original LDM/CompVis key layout read with diffusers' single-file loader and local
configs. The files are written here: the tiny SD1.5-topology model (and, on the meta device, a full-size one)
converted from diffusers' layout to the original one by this file's own key map."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fact_lightning.models.base import load_base_model
from fact_lightning.models.single_file import (SD15_CONFIG, SingleFileError, check_single_file, component_mismatches,
                                               convert, single_file_problems, single_file_vae_name)
from fact_lightning.models.single_file_vae import load_single_file_vae
from fact_lightning.training.base_spec import PretrainedBase

# -- diffusers -> original (LDM) keys: the inverse of what the loader reads -----------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def ldm_unet_key(key: str, config: dict) -> str:
    for diffusers, ldm in _UNET_FIXED.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers):]
    per_block = config["layers_per_block"] + 1  # each LDM level: its layers, then a down/upsampler slot
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{per_block * (i + 1)}.0.{rest.replace('conv.', 'op.')}"
            index = per_block * i + j + 1
            return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        if kind == "upsamplers":
            has_attention = config["up_block_types"][i].startswith("CrossAttn")
            return f"output_blocks.{per_block * i + per_block - 1}.{2 if has_attention else 1}.{rest}"
        index = per_block * i + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    assert m, key
    kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
    return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"


def ldm_vae_key(key: str, config: dict) -> tuple[str, bool]:
    """(original key, whether a linear weight becomes a 1x1 convolution there)."""
    levels = len(config["block_out_channels"])
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    if "mid_block.attentions.0." in key:
        head, _, rest = key.partition("mid_block.attentions.0.")
        name, _, tail = rest.rpartition(".")
        return f"{head}mid.attn_1.{_VAE_ATTENTION[name]}.{tail}", name != "group_norm" and tail == "weight"
    return key, False


def to_ldm(base) -> dict[str, torch.Tensor]:
    """A diffusers UNet, VAE and text encoder as one state dict in the original SD checkpoint layout."""
    out = {f"model.diffusion_model.{ldm_unet_key(k, base.unet.config)}": v for k, v in base.unet.state_dict().items()}
    for key, value in base.vae.state_dict().items():
        ldm, to_conv = ldm_vae_key(key, base.vae.config)
        out[f"first_stage_model.{ldm}"] = value[:, :, None, None] if to_conv else value
    for key, value in base.text_encoder.state_dict().items():
        out[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    return out


def write_configs(base, folder: Path) -> Path:
    """The component configs of ``base`` as a diffusers folder (no weights), what ``config`` takes."""
    base.unet.save_config(folder / "unet")
    base.vae.save_config(folder / "vae")
    base.text_encoder.config.save_pretrained(folder / "text_encoder")
    base.noise_scheduler.save_config(folder / "scheduler")
    return folder


def write_single_file(base, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in to_ldm(base).items()}, path)
    return path


@pytest.fixture
def tiny_file(tiny_base, tmp_path) -> tuple[Path, Path]:
    return write_single_file(tiny_base, tmp_path / "tiny-sd15.safetensors"), write_configs(tiny_base, tmp_path / "cfg")


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- tests ----------------------------------------------------------------------------------------------------
def test_a_tiny_single_file_loads_to_the_same_weights(tiny_base, tiny_file):
    path, config = tiny_file
    loaded = load_base_model(path, config=config)
    for ours, theirs in zip(loaded.frozen_modules(), tiny_base.frozen_modules()):
        assert type(ours) is type(theirs)
        assert same_state(ours, theirs), type(ours).__name__
        assert not any(p.requires_grad for p in ours.parameters())
    ids = loaded.tokenizer(["a photo of"]).input_ids[0]
    assert ids[1:4] == [320, 1125, 539]  # SD1.5's tokens, rebuilt offline when the config folder has no tokenizer
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10])
    assert torch.equal(loaded.unet(latents, t, text).sample, tiny_base.unet(latents, t, text).sample)


def test_an_inpainting_file_keeps_its_nine_input_channels(tiny_base, tmp_path):
    """An SD1.5 inpainting checkpoint differs only in its first convolution; the configs need not say so."""
    import dataclasses

    from fact_lightning.tiny import tiny_inpaint_unet

    inpaint = dataclasses.replace(tiny_base, unet=tiny_inpaint_unet(tiny_base, seed=1))
    path = write_single_file(inpaint, tmp_path / "inpaint.safetensors")
    loaded = load_base_model(path, config=write_configs(tiny_base, tmp_path / "cfg"))  # in_channels 4 there
    assert loaded.unet.config.in_channels == 9 and same_state(loaded.unet, inpaint.unet)


def test_the_vae_alone_loads_for_cached_latents(tiny_base, tiny_file):
    path, config = tiny_file
    vae = load_single_file_vae(path, config)
    assert same_state(vae, tiny_base.vae) and not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(SingleFileError, match="is not an SD1.5 checkpoint"):
        load_single_file_vae(path)  # the tiny file against SD1.5's configs


def test_the_frozen_dtype_applies_to_a_single_file(tiny_file):
    path, config = tiny_file
    base = PretrainedBase(str(path), config=str(config), frozen_dtype="bfloat16").build()
    assert {p.dtype for m in base.frozen_modules() for p in m.parameters()} == {torch.bfloat16}


def full_size_checkpoint() -> dict[str, torch.Tensor]:
    """A full-size SD1.5 in the original layout, on the meta device: every key and shape, no bytes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fact_lightning.models.base import BaseModel

    with torch.device("meta"):
        full = BaseModel(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")),
                         AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")),
                         CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")), None,
                         DDPMScheduler())
    return to_ldm(full)


def write_sparse_float16_file(checkpoint: dict[str, torch.Tensor], path: Path) -> Path:
    """A safetensors file of ``checkpoint``'s keys and shapes in float16, all zeros, written sparse (the 2 GB of a
    full-size SD1.5 take no disk space)."""
    header, offset = {}, 0
    for key, value in checkpoint.items():
        size = value.numel() * 2
        header[key] = {"dtype": "F16", "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little") + text)
        file.truncate(8 + len(text) + offset)
    return path


def test_the_packaged_sd15_configs_take_every_key_and_shape_of_a_full_size_checkpoint():
    """A full-size SD1.5 (built on the meta device from the packaged configs, written in the original layout by
    this file's key map) converts to exactly the weights and shapes those configs need: nothing missing, nothing
    left over. A few keys as they appear in the released SD1.5 files anchor the layout."""
    checkpoint = full_size_checkpoint()
    released = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight": [320, 640, 1, 1],
                "model.diffusion_model.middle_block.1.proj_in.weight": [1280, 1280, 1, 1],
                "model.diffusion_model.input_blocks.3.0.op.weight": [320, 320, 3, 3],
                "model.diffusion_model.output_blocks.2.1.conv.weight": [1280, 1280, 3, 3],
                "first_stage_model.encoder.mid.attn_1.q.weight": [512, 512, 1, 1],
                "first_stage_model.decoder.up.3.block.0.conv1.weight": [512, 512, 3, 3],
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": [256, 128, 1, 1],
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
                "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}
    for key, shape in released.items():
        assert list(checkpoint[key].shape) == shape, key
    assert component_mismatches(checkpoint, SD15_CONFIG) == []
    parts = convert(checkpoint, SD15_CONFIG)
    assert sum(len(p) for p in parts.values()) == len(checkpoint)  # every key of the file maps somewhere
    assert sum(v.numel() for v in parts["unet"].values()) == 859_520_964  # SD1.5's UNet


def test_a_checkpoint_of_another_topology_is_named_with_what_differs(tiny_file):
    path, _ = tiny_file  # the tiny file against the packaged SD1.5 configs
    problems = single_file_problems(path, None, option="--base")
    assert len(problems) == 1
    assert f"base model file {path} is not an SD1.5 checkpoint of the configs in {SD15_CONFIG}" in problems[0]
    assert "weights of another shape" in problems[0] and "(--base)" in problems[0]


def test_an_sdxl_shaped_file_is_refused_and_named(tmp_path):
    """SDXL's keys (its second text encoder, label embedding, 10-block transformer levels) are not SD1.5's."""
    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": torch.zeros(640, 2048),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, path)
    (problem,) = single_file_problems(path)
    assert "(it looks like an SDXL base model)" in problem, problem
    for fragment in ("UNet (model.diffusion_model.*): 685 of its 686 weights missing",
                     "VAE (first_stage_model.*): 247 of its 248 weights missing",
                     "text encoder (cond_stage_model.transformer.*): 195 of its 196 weights missing"):
        assert fragment in problem, problem


def test_files_that_are_not_a_complete_safetensors_checkpoint_are_refused_before_loading(tmp_path, tiny_file):
    path, config = tiny_file
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    random_keys = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.zeros(3), "bar": torch.ones(2, 2)}, random_keys)
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, pickle)
    renamed_pickle = tmp_path / "model.safetensors"
    renamed_pickle.write_bytes(pickle.read_bytes())
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    expected = {truncated: "is truncated: its header describes", random_keys: "it holds no SD UNet",
                pickle: "is a pickle (a torch .ckpt/.pt)", renamed_pickle: "is a pickle",
                text: "is not a safetensors file", tmp_path / "gone.safetensors": "does not exist"}
    for bad, fragment in expected.items():
        problems = single_file_problems(bad, config)
        assert len(problems) == 1 and fragment in problems[0], (bad, problems)
        with pytest.raises(SingleFileError, match=re.escape(fragment)):
            load_base_model(bad, config=config)


def test_a_config_folder_that_lacks_a_config_is_named(tiny_file, tmp_path):
    path, config = tiny_file
    (config / "vae" / "config.json").unlink()
    assert single_file_problems(path, config) == [f"base model config folder {config} is missing vae/config.json"]
    (config / "vae" / "config.json").write_text("{ not json")
    (problem,) = single_file_problems(path, config)
    assert problem.startswith(f"base model config folder {config} does not describe models diffusers can build: ")


def test_the_vae_name_follows_the_vae_weights_only(tiny_base, tmp_path):
    a = write_single_file(tiny_base, tmp_path / "a.safetensors")
    name = single_file_vae_name(a)
    assert re.fullmatch(r"a\.safetensors@vae-sha256:[0-9a-f]{16}", name), name
    assert PretrainedBase(str(a)).describe_vae() == name
    with torch.no_grad():
        tiny_base.unet.conv_in.weight.add_(1.0)  # another UNet, the same VAE: the same VAE name
    (tmp_path / "sub").mkdir()
    assert single_file_vae_name(write_single_file(tiny_base, tmp_path / "sub" / "a.safetensors")) == name
    with torch.no_grad():
        tiny_base.vae.decoder.conv_out.bias.add_(1.0)
    c = write_single_file(tiny_base, tmp_path / "c.safetensors")
    assert single_file_vae_name(c).split("@")[1] != name.split("@")[1]


def test_a_config_folder_with_a_diffusers_folder_source_is_refused(tiny_base, tmp_path):
    tiny_base.save_pretrained(tmp_path / "sd")
    spec = PretrainedBase(str(tmp_path / "sd"), config=str(tmp_path / "cfg"))
    (problem,) = spec.weight_problems()
    assert "goes with a single-file source" in problem


@pytest.mark.slow
def test_loads_offline_with_no_hub_cache(tiny_file, tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1, an empty hub cache and an endpoint that refuses connections,
    the single file loads (check and load): nothing is fetched from the hub."""
    path, config = tiny_file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "TRANSFORMERS_OFFLINE": "1"}
    code = ("import json, sys; from fact_lightning.training.base_spec import PretrainedBase; "
            f"s = PretrainedBase({str(path)!r}, config={str(config)!r}); assert s.weight_problems() == []; "
            "b = s.build(); print(json.dumps([type(m).__name__ for m in b.frozen_modules()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == ["UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"]
    assert not any((tmp_path / "hf").rglob("*.json"))  # nothing was cached: nothing came from the hub
    check_single_file(path, config)  # and the file itself passes the header check here too


@pytest.mark.slow
def test_a_full_size_file_loads_offline_with_the_packaged_configs_alone(tmp_path):
    """What a user downloads (one full-size SD1.5 .safetensors, here float16 zeros, sparse) is all it takes: in a
    fresh process with HF_HUB_OFFLINE=1 and an empty hub cache, the packaged configs and the offline tokenizer
    build SD1.5's UNet, VAE and text encoder, every weight read from the file (none left uninitialised)."""
    path = write_sparse_float16_file(full_size_checkpoint(), tmp_path / "majicmix-like.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "TRANSFORMERS_OFFLINE": "1"}
    code = f"""
import json
from fact_lightning.training.base_spec import PretrainedBase
spec = PretrainedBase({str(path)!r}, frozen_dtype="float16")
assert spec.weight_problems() == []
base = spec.build()
params = [p for m in base.frozen_modules() for p in m.parameters()]
print(json.dumps({{"count": sum(p.numel() for p in params), "devices": sorted({{p.device.type for p in params}}),
                  "dtypes": sorted({{str(p.dtype) for p in params}}), "max": max(float(p.abs().max()) for p in params),
                  "cross": base.unet.config.cross_attention_dim, "tokens": base.tokenizer(["a photo of"]).input_ids[0],
                  "scheduler": type(base.noise_scheduler).__name__,
                  "timesteps": base.noise_scheduler.config.num_train_timesteps}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.splitlines()[-1])
    assert facts["count"] == 859_520_964 + 83_653_863 + 123_060_480  # SD1.5's UNet, VAE and text encoder
    assert facts["devices"] == ["cpu"] and facts["dtypes"] == ["torch.float16"] and facts["max"] == 0.0
    assert facts["cross"] == 768 and facts["tokens"] == [49406, 320, 1125, 539, 49407]
    assert facts["scheduler"] == "DDPMScheduler" and facts["timesteps"] == 1000
    assert not any((tmp_path / "hf").rglob("*.json"))

import json

import pytest
import torch

from fact_lightning.inference.bases import BASE_TYPE_KEY, adapter_base_type
from fact_lightning.models.adapter_io import FORMAT_VERSION, load_adapter, read_adapter_metadata, save_adapter
from fact_lightning.interop.official import export_fact_checkpoint
from fact_lightning.models.injection import FaceAdapter
from tests.conftest import tiny_projection_config


@pytest.fixture
def trained_adapter(tiny_base):
    torch.manual_seed(0)
    adapter = FaceAdapter.for_unet(tiny_base.unet, tiny_projection_config())
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.alpha_attn.fill_(0.7)
    return adapter


def test_native_round_trip_keeps_weights_and_metadata(trained_adapter, tiny_base, tmp_path):
    path = save_adapter(trained_adapter, tmp_path / "adapter.safetensors", {"base_model": "tiny", "step": 12})
    meta = read_adapter_metadata(path)
    assert meta["format_version"] == str(FORMAT_VERSION) and meta["base_model"] == "tiny" and json.loads(meta["step"]) == 12
    trained_adapter.detach()
    loaded = load_adapter(path, tiny_base.unet)
    original, again = trained_adapter.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    assert loaded.projection.config == tiny_projection_config() and len(loaded.attached_blocks) == 16


def test_one_loader_reads_both_formats(trained_adapter, tiny_base, tmp_path):
    official = export_fact_checkpoint(trained_adapter, tmp_path / "adapter.ckpt")
    trained_adapter.detach()
    loaded = load_adapter(official, tiny_base.unet)
    assert torch.equal(loaded.blocks["mid_block_attentions_0_transformer_blocks_0"].alpha_attn, torch.tensor([0.7]))


def test_bad_native_files_are_clear_errors(trained_adapter, tiny_base, tmp_path):
    path = save_adapter(trained_adapter, tmp_path / "a.safetensors")
    trained_adapter.detach()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(cut)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="is not a fact-lightning-adapter"):
        load_adapter(tmp_path / "foreign.safetensors")
    save_file(trained_adapter.state_dict(), str(tmp_path / "future.safetensors"),
              metadata={**read_adapter_metadata(path), "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match="format version"):
        load_adapter(tmp_path / "future.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapter(tmp_path / "none.safetensors")

    from fact_lightning.tiny import tiny_base_model

    other_unet = tiny_base_model(seed=0, cross_attention_dim=48).unet
    with pytest.raises(ValueError, match="another UNet layout"):
        load_adapter(path, other_unet)


def test_the_base_type_is_recorded_and_files_without_it_still_load(trained_adapter, tiny_base, tmp_path):
    typed = save_adapter(trained_adapter, tmp_path / "typed.safetensors", {"step": 3}, base_type="sd15")
    plain = save_adapter(trained_adapter, tmp_path / "plain.safetensors", {"step": 3})
    assert read_adapter_metadata(typed)[BASE_TYPE_KEY] == "sd15" and adapter_base_type(typed) == "sd15"
    assert BASE_TYPE_KEY not in read_adapter_metadata(plain) and adapter_base_type(plain) is None
    assert json.loads(read_adapter_metadata(typed)["step"]) == 3  # the other metadata as before
    trained_adapter.detach()
    for path in (typed, plain):  # the key changes nothing for the loader
        loaded = load_adapter(path, tiny_base.unet)
        assert len(loaded.attached_blocks) == 16
        loaded.detach()
    assert read_adapter_metadata(save_adapter(trained_adapter, tmp_path / "xl.safetensors",
                                              base_type="sdxl"))[BASE_TYPE_KEY] == "sdxl"
    with pytest.raises(ValueError, match="base_type must be one of sd15, sdxl, got 'sd3'"):
        save_adapter(trained_adapter, tmp_path / "bad.safetensors", base_type="sd3")
    with pytest.raises(ValueError, match="metadata says base_type='sdxl' but base_type='sd15'"):
        save_adapter(trained_adapter, tmp_path / "bad.safetensors", {BASE_TYPE_KEY: "sdxl"}, base_type="sd15")
    assert not (tmp_path / "bad.safetensors").exists()

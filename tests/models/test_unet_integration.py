"""The attached adapter travels with its UNet through torch/diffusers/accelerate features, yet stays out of
the UNet's own weights (its state dict, save_pretrained, loading a base state dict)."""

import copy

import pytest
import torch

from fact_lightning.models.injection import FaceAdapter
from tests.conftest import TINY_TOKEN_DIM, tiny_projection_config


def _open_adapter(unet, seed=0):
    torch.manual_seed(seed)
    adapter = FaceAdapter.for_unet(unet, tiny_projection_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.alpha_attn.copy_(0.5 + torch.rand((), generator=g))
            block.alpha_dense.copy_(0.5 + torch.rand((), generator=g))
    return adapter.eval()


def _face(adapter, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return adapter.project(torch.randn(batch, 144, TINY_TOKEN_DIM, generator=g))


def run(unet, inputs, **kwargs):
    with torch.no_grad():
        return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"], **kwargs).sample


def _cast(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def test_unet_to_casts_and_moves_the_attached_blocks(tiny_unet, unet_inputs):
    adapter = _open_adapter(tiny_unet)
    face = _face(adapter)
    fp32 = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face))
    tiny_unet.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter.blocks.parameters())
    assert adapter.projection.latents.dtype == torch.float32  # the projection is not part of the UNet
    fp64 = run(tiny_unet, _cast(unet_inputs, torch.float64), cross_attention_kwargs=adapter.condition(face))
    assert fp64.dtype == torch.float64 and torch.allclose(fp64.float(), fp32, atol=1e-5)
    assert (fp64.float() - run(tiny_unet.float(), unet_inputs)).abs().max() > 1e-3  # the adapter acted
    tiny_unet.to("meta")  # a device move: every attached weight follows
    assert all(p.device.type == "meta" for p in adapter.blocks.parameters())


def test_accelerate_offload_hook_moves_the_blocks_with_the_unet(tiny_unet, unet_inputs):
    """``enable_model_cpu_offload`` puts accelerate's ``CpuOffload`` hook on each model: before a forward it moves
    the whole module (``module.to``) and the call's tensors to the execution device. That needs an accelerator
    in diffusers; here the hook itself runs with the meta device as the "accelerator"."""
    from accelerate import cpu_offload_with_hook

    adapter = _open_adapter(tiny_unet)
    face = _face(adapter)  # stays on the CPU, in a FaceCondition that accelerate does not move: the blocks do
    calls = []
    for block in adapter.blocks.values():
        block.register_forward_hook(lambda m, args, out: calls.append(out.device.type))
    unet, hook = cpu_offload_with_hook(tiny_unet, execution_device="meta")
    out = run(unet, unet_inputs, cross_attention_kwargs=adapter.condition(face))
    assert out.device.type == "meta" and out.shape == unet_inputs["sample"].shape
    assert calls == ["meta"] * 16
    assert all(p.device.type == "meta" for p in adapter.blocks.parameters())
    hook.remove()


def test_deepcopy_carries_its_own_adapter_copy(tiny_unet, unet_inputs):
    adapter = _open_adapter(tiny_unet)
    face = _face(adapter)
    expected = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face))
    copied = copy.deepcopy(tiny_unet)
    fusers = [copied.get_submodule(site.path).fuser for site in adapter.sites]
    assert all(f is not adapter.blocks[s.key] for f, s in zip(fusers, adapter.sites))
    assert torch.equal(run(copied, unet_inputs, cross_attention_kwargs=adapter.condition(face)), expected)
    assert set(copied.state_dict()) == set(tiny_unet.state_dict())  # the copy's state dict is the base's too
    with torch.no_grad():  # the copies are independent: closing the original's gates leaves the copy as it was
        for block in adapter.blocks.values():
            block.alpha_attn.zero_()
            block.alpha_dense.zero_()
    assert torch.equal(run(copied, unet_inputs, cross_attention_kwargs=adapter.condition(face)), expected)


def test_unet_weights_stay_the_base_model(tiny_unet, unet_inputs, tmp_path):
    base_state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    adapter = _open_adapter(tiny_unet)
    assert tiny_unet.state_dict().keys() == base_state.keys()
    assert not any(".fuser." in k for k in tiny_unet.down_blocks.state_dict())  # also when saved by parts
    tiny_unet.save_pretrained(tmp_path / "unet")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == base_state.keys() and all(torch.equal(saved[k], base_state[k]) for k in saved)
    # A base state dict loads strictly into the UNet with the adapter attached, and leaves the adapter as it was.
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    with torch.no_grad():
        tiny_unet.conv_in.weight.add_(1.0)
    assert tiny_unet.load_state_dict(base_state, strict=True).missing_keys == []
    assert torch.equal(tiny_unet.conv_in.weight, base_state["conv_in.weight"])
    assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())
    adapter.detach()
    assert not any(k.startswith("fuser") or ".fuser" in name for name, _ in tiny_unet.named_modules() for k in [name])
    assert tiny_unet.state_dict().keys() == base_state.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_zero_is_bit_equal_after_moving_with_the_unet(tiny_unet, unet_inputs, dtype):
    adapter = _open_adapter(tiny_unet)
    tiny_unet.to(dtype)
    inputs = _cast(unet_inputs, dtype)
    face = _face(adapter)  # computed by the projection, which stayed in float32: the blocks convert it
    assert torch.equal(run(tiny_unet, inputs, cross_attention_kwargs=adapter.condition(face, 0.0)), run(tiny_unet, inputs))

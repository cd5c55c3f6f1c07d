import logging

import pytest
import torch

from fact_lightning.models.injection import FaceAdapter, mark_only_adapter_trainable
from fact_lightning.models.unet_layout import depth_tag, transformer_block_sites
from tests.conftest import TINY_TOKEN_DIM, tiny_projection_config


def _adapter(unet, seed=0):
    torch.manual_seed(seed)
    return FaceAdapter.for_unet(unet, tiny_projection_config())


def _open_gates(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.alpha_attn.copy_(torch.randn((), generator=g))
            block.alpha_dense.copy_(torch.randn((), generator=g))


def _face(adapter, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return adapter.project(torch.randn(batch, 144, TINY_TOKEN_DIM, generator=g))


def run(unet, inputs, **kwargs):
    return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"], **kwargs).sample


def test_all_sixteen_blocks_of_the_sd15_topology_are_adapted(tiny_unet):
    sites = transformer_block_sites(tiny_unet)
    assert len(sites) == 16
    assert [s.stage for s in sites].count("down") == 6 and [s.stage for s in sites].count("up") == 9
    assert {s.width for s in sites} == {32, 64}
    assert depth_tag(sites[0], tiny_unet.config) == "res0_down"
    assert depth_tag(sites[6], tiny_unet.config) == "res3_mid"
    assert depth_tag(sites[-1], tiny_unet.config) == "res0_up"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_adapter_leaves_the_unet_unchanged(tiny_unet, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.randint(0, 1000, (2,), generator=g),
        "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
    }
    with torch.no_grad():
        base = run(tiny_unet, inputs)
        adapter = _adapter(tiny_unet, seed)
        out = run(tiny_unet, inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2, seed)))
    assert torch.equal(out, base)


def test_scale_zero_equals_the_base_unet_and_open_gates_change_it(tiny_unet, unet_inputs):
    with torch.no_grad():
        base = run(tiny_unet, unet_inputs)
        adapter = _adapter(tiny_unet)
        _open_gates(adapter)
        face = _face(adapter, 2)
        assert torch.equal(run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face, adapter_scale=0.0)), base)
        full = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face, adapter_scale=1.0))
        half = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face, adapter_scale=0.5))
    assert (full - base).abs().max() > 1e-3
    assert 0 < (half - base).abs().max() < (full - base).abs().max()


def test_detach_restores_the_base_unet(tiny_unet, unet_inputs):
    with torch.no_grad():
        base = run(tiny_unet, unet_inputs)
        adapter = _adapter(tiny_unet)
        _open_gates(adapter)
        adapter.detach()
        assert torch.equal(run(tiny_unet, unet_inputs), base)
        assert not any(hasattr(b, "fuser") and b.fuser is not None for b in adapter.blocks.values())
        adapter.attach(tiny_unet)
        assert len(adapter.attached_blocks) == 16


def test_unet_state_dict_stays_the_base_model(tiny_unet):
    keys = set(tiny_unet.state_dict())
    adapter = _adapter(tiny_unet)
    assert set(tiny_unet.state_dict()) == keys
    with pytest.raises(RuntimeError, match="already attached"):
        adapter.attach(tiny_unet)
    with pytest.raises(ValueError, match="already has a GLIGEN fuser"):
        FaceAdapter.for_unet(tiny_unet, tiny_projection_config())


def test_mixed_batch_matches_per_sample_calls(tiny_unet, unet_inputs):
    """A batch mixing a conditioned and an id-dropped sample computes each as if alone (CFG relies on it)."""
    adapter = _adapter(tiny_unet)
    _open_gates(adapter)
    with torch.no_grad():
        face = _face(adapter, 1)
        null = adapter.null_embedding(1)
        mixed = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(torch.cat([face, null])))
        for i, emb in enumerate([face, null]):
            single = {k: v[i : i + 1] for k, v in unet_inputs.items()}
            alone = run(tiny_unet, single, cross_attention_kwargs=adapter.condition(emb))
            assert torch.allclose(mixed[i : i + 1], alone, atol=1e-5)
        # Several reference photos: 16 tokens each, concatenated.
        two_photos = torch.cat([face, _face(adapter, 1, seed=5)], dim=1)
        assert run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(two_photos)).shape == mixed.shape
        per_sample = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face, adapter_scale=torch.tensor([1.0, 0.0])))
        base = run(tiny_unet, unet_inputs)
    assert torch.equal(per_sample[1], base[1]) and not torch.allclose(per_sample[0], base[0])


def test_processors_never_see_the_condition_key(tiny_unet, unet_inputs, caplog):
    adapter = _adapter(tiny_unet)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2)))
    assert "not expected" not in caplog.text


def test_capture_exposes_input_and_increment_of_every_block(tiny_unet, unet_inputs):
    adapter = _adapter(tiny_unet)
    _open_gates(adapter)
    with adapter.capture() as records, torch.no_grad():
        run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2)))
    assert list(records) == [s.path for s in adapter.sites]
    for site in adapter.sites:
        x, increment = records[site.path]
        assert x.shape == increment.shape and x.shape[0] == 2 and x.shape[2] == site.width
        assert x.shape[1] in (16 * 16, 8 * 8, 4 * 4, 2 * 2)
        assert increment.abs().sum() > 0
    with torch.no_grad():
        run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2)))
    assert all(b.sink is None for b in adapter.blocks.values())  # recording ended with the context


def test_optimiser_steps_train_only_the_adapter(tiny_base, unet_inputs):
    unet = tiny_base.unet
    adapter = _adapter(unet)
    mark_only_adapter_trainable(unet, adapter, tiny_base.vae, tiny_base.text_encoder)
    frozen_before = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    target = torch.randn_like(unet_inputs["sample"])

    def step():
        optimizer.zero_grad()
        out = run(unet, unet_inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2)))
        ((out - target) ** 2).mean().backward()
        optimizer.step()

    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    step()
    first = {k: v.clone() for k, v in adapter.state_dict().items()}
    moved = {k for k in first if not torch.equal(first[k], before[k])}
    # Zero gates block every other gradient on the first step: only the gates move (GLIGEN's zero-init).
    assert moved == {k for k in first if k.endswith(("alpha_attn", "alpha_dense"))}
    assert len(moved) == 32
    step()
    second = adapter.state_dict()
    moved = {k for k in second if not torch.equal(second[k], first[k])}
    assert any(k.startswith("projection.") for k in moved)
    assert any(".attn.to_q." in k for k in moved) and any(".ff.net.2." in k for k in moved)
    # The attached blocks are registered in the UNet (they move with it), so its parameters include theirs.
    adapter_params = {id(p) for p in adapter.parameters()}
    assert {id(p) for p in unet.parameters()} & adapter_params == {id(p) for p in adapter.blocks.parameters()}
    base_params = [p for m in tiny_base.frozen_modules() for p in m.parameters() if id(p) not in adapter_params]
    assert base_params and all(p.grad is None and not p.requires_grad for p in base_params)
    assert all(torch.equal(v, frozen_before[k]) for k, v in unet.state_dict().items())


def test_gradient_checkpointing_routes_the_condition_too(tiny_unet, unet_inputs):
    adapter = _adapter(tiny_unet)
    _open_gates(adapter)
    face = _face(adapter, 2).detach()
    with torch.no_grad():
        plain = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face))
    tiny_unet.enable_gradient_checkpointing()
    tiny_unet.train()
    checkpointed = run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(face))
    checkpointed.mean().backward()
    assert torch.allclose(checkpointed, plain, atol=1e-5)
    assert all(b.alpha_attn.grad is not None for b in adapter.blocks.values())


def test_batch_mismatch_is_a_clear_error(tiny_unet, unet_inputs):
    adapter = _adapter(tiny_unet)
    with pytest.raises(ValueError, match="batch"), torch.no_grad():
        run(tiny_unet, unet_inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 3)))


def test_condition_carries_the_lora_scale_under_diffusers_key():
    kwargs = FaceAdapter.condition(torch.zeros(1, 16, 32), adapter_scale=0.5, lora_scale=0.8, other=1)
    assert kwargs["scale"] == 0.8 and kwargs["other"] == 1 and kwargs["fact"].adapter_scale == 0.5
    positional = FaceAdapter.condition(torch.zeros(1, 16, 32), 0.5)
    assert "scale" not in positional and positional["fact"].adapter_scale == 0.5
    with pytest.raises(TypeError, match="adapter_scale"):  # the old keyword must not silently become the LoRA scale
        FaceAdapter.condition(torch.zeros(1, 16, 32), scale=0.5)


def test_fp32_adapter_on_a_bf16_unet(tiny_unet, unet_inputs):
    """The real config freezes SD1.5 in bf16 and trains an fp32 adapter; previews run outside autocast."""
    unet = tiny_unet.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in unet_inputs.items()}
    adapter = _adapter(unet)
    with torch.no_grad():
        base = run(unet, inputs)
        assert torch.equal(run(unet, inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2))), base)
        _open_gates(adapter)
        out = run(unet, inputs, cross_attention_kwargs=adapter.condition(_face(adapter, 2)))
    assert out.dtype == torch.bfloat16 and not torch.equal(out, base)

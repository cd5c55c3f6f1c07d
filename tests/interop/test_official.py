"""Parity with the official FACT release, whose computation is re-written here from reading its code."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fact_lightning.interop.official import export_fact_checkpoint, load_fact_checkpoint, load_transface
from fact_lightning.models.face_encoder import build_transface
from fact_lightning.models.injection import FaceAdapter
from fact_lightning.models.resampler import ResamplerConfig
from fact_lightning.models.unet_layout import transformer_block_sites
from tests.conftest import TINY_TOKEN_DIM, tiny_projection_config
from tests.models.test_resampler import official_resampler


class OfficialFaceProcessor:
    """The official attn2 processor's maths: gated self-attention over [x, face], then norm2 and cross-attention.

    The face tokens arrive appended to the text tokens; the block's norm2 was moved in here as ``ln``.
    """

    def __init__(self, weights: dict, ln: torch.nn.Module, scale: float, num_face_tokens: int):
        self.w, self.ln, self.scale, self.num_face = weights, ln, scale, num_face_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        w, h0 = self.w, hidden_states
        text, face = encoder_hidden_states[:, : -self.num_face], encoder_hidden_states[:, -self.num_face :]
        face = F.linear(face, w["linear.weight"], w["linear.bias"])
        b, n, c = hidden_states.shape
        z = F.layer_norm(torch.cat([hidden_states, face], 1), (c,), w["norm1.weight"], w["norm1.bias"])
        heads = attn.heads

        def split(t):
            return t.view(b, -1, heads, c // heads).permute(0, 2, 1, 3).reshape(b * heads, -1, c // heads)

        q, k, v = (split(z @ w[f"attn.to_{x}.weight"].T) for x in "qkv")
        probs = (torch.einsum("bic,bjc->bij", q, k) * (c // heads) ** -0.5).softmax(-1)
        out = torch.einsum("bij,bjc->bic", probs, v).view(b, heads, -1, c // heads).permute(0, 2, 1, 3).reshape(b, -1, c)
        out = F.linear(out, w["attn.to_out.0.weight"], w["attn.to_out.0.bias"])
        hidden_states = hidden_states + self.scale * torch.tanh(w["alpha_attn"]) * out[:, :n]
        y = F.layer_norm(hidden_states, (c,), w["norm2.weight"], w["norm2.bias"])
        y, gate = F.linear(y, w["ff.net.0.proj.weight"], w["ff.net.0.proj.bias"]).chunk(2, -1)
        y = F.linear(y * F.gelu(gate), w["ff.net.2.weight"], w["ff.net.2.bias"])
        hidden_states = hidden_states + self.scale * torch.tanh(w["alpha_dense"]) * y
        residual = hidden_states
        query = attn.head_to_batch_dim(attn.to_q(self.ln(hidden_states)))
        key, value = attn.head_to_batch_dim(attn.to_k(text)), attn.head_to_batch_dim(attn.to_v(text))
        cross = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, None), value))
        cross = attn.to_out[1](attn.to_out[0](cross))
        return cross + residual - h0


def official_unet_output(unet, state, inputs, face_embedding, scale):
    """Runs a copy of ``unet`` wired as the official code wires it, with the official state dict."""
    unet = copy.deepcopy(unet)
    for name in [n.removesuffix(".attn2.processor") for n in unet.attn_processors if n.endswith("attn2.processor")]:
        block = unet.get_submodule(name)
        prefix = f"{name}.attn2.processor."
        ln = torch.nn.LayerNorm(block.norm2.normalized_shape)
        ln.load_state_dict({"weight": state[prefix + "ln.weight"], "bias": state[prefix + "ln.bias"]})
        block.norm2 = torch.nn.Identity()
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        block.attn2.set_processor(OfficialFaceProcessor(weights, ln, scale, face_embedding.shape[1]))
    text = torch.cat([inputs["encoder_hidden_states"], face_embedding], 1)
    return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=text).sample


@pytest.fixture
def official_file(tiny_unet, tmp_path):
    """An official-format checkpoint with random weights, open gates and a norm2 that differs from the UNet's."""
    torch.manual_seed(0)
    source_unet = copy.deepcopy(tiny_unet)
    adapter = FaceAdapter.for_unet(source_unet, tiny_projection_config())
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks.values()):
            block.alpha_attn.fill_(0.3 + 0.05 * i)
            block.alpha_dense.fill_(-0.4 + 0.03 * i)
        for block in adapter.attached_blocks:
            block.norm2.weight.add_(0.1 * torch.randn_like(block.norm2.weight))
    return export_fact_checkpoint(adapter, tmp_path / "fact_adapter.ckpt")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_adapter_matches_the_official_computation(tiny_unet, official_file, unet_inputs, scale):
    state = torch.load(official_file, weights_only=True)
    tokens = torch.randn(2, 144, TINY_TOKEN_DIM, generator=torch.Generator().manual_seed(1))
    projection_state = {k.removeprefix("local_fac_prj."): v for k, v in state.items() if k.startswith("local_fac_prj.")}
    with torch.no_grad():
        expected_embedding = official_resampler(projection_state, tiny_projection_config(), tokens)
        expected = official_unet_output(tiny_unet, state, unet_inputs, expected_embedding, scale)
        adapter = load_fact_checkpoint(official_file, tiny_unet)
        embedding = adapter.project(tokens)
        ours = tiny_unet(unet_inputs["sample"], unet_inputs["timestep"], encoder_hidden_states=unet_inputs["encoder_hidden_states"],
                         cross_attention_kwargs=adapter.condition(embedding, adapter_scale=scale)).sample
    assert torch.allclose(embedding, expected_embedding, atol=1e-5)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_scale_zero_equals_the_unet_without_adapters(tiny_unet, official_file, unet_inputs):
    adapter = load_fact_checkpoint(official_file, tiny_unet)  # also loads the checkpoint's norm2
    with torch.no_grad():
        plain = tiny_unet(unet_inputs["sample"], unet_inputs["timestep"], encoder_hidden_states=unet_inputs["encoder_hidden_states"]).sample
        zero = tiny_unet(unet_inputs["sample"], unet_inputs["timestep"], encoder_hidden_states=unet_inputs["encoder_hidden_states"],
                         cross_attention_kwargs=adapter.condition(adapter.null_embedding(2), adapter_scale=0.0)).sample
    assert torch.equal(plain, zero)


def test_official_round_trip_is_lossless(tiny_unet, official_file, tmp_path):
    original = torch.load(official_file, weights_only=True)
    adapter = load_fact_checkpoint(official_file, tiny_unet)
    assert adapter.projection.config == tiny_projection_config()
    again = torch.load(export_fact_checkpoint(adapter, tmp_path / "again.ckpt"), weights_only=True)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert sum(k.endswith(".ln.weight") for k in original) == 16
    assert original["mid_block.attentions.0.transformer_blocks.0.attn2.processor.alpha_attn"].dim() == 0  # as released


def test_official_sd15_key_names_are_produced(tiny_unet, official_file):
    keys = torch.load(official_file, weights_only=True).keys()
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor."
    for param in ["linear.weight", "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight", "attn.to_out.0.weight",
                  "ff.net.0.proj.weight", "ff.net.2.weight", "norm1.weight", "norm2.weight", "alpha_attn", "alpha_dense", "ln.weight"]:
        assert prefix + param in keys
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.processor.alpha_attn" in keys
    assert "local_fac_prj.latents" in keys and "local_fac_prj.layers.1.1.3.weight" in keys


def test_damaged_and_mismatched_files_are_clear_errors(tiny_unet, official_file, tmp_path):
    state = torch.load(official_file, weights_only=True)
    cases = {}
    cases["truncated"] = official_file.read_bytes()[: official_file.stat().st_size // 2]
    cases["garbage"] = b"not a checkpoint at all" * 10
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable torch checkpoint"):
            load_fact_checkpoint(tmp_path / name, copy.deepcopy(tiny_unet))

    missing = dict(state)
    del missing["up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.ff.net.2.weight"]
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"1 missing keys .*up_blocks.3.attentions.2"):
        load_fact_checkpoint(tmp_path / "missing.ckpt", copy.deepcopy(tiny_unet))

    wrong_shape = dict(state)
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.processor.attn.to_k.weight"
    wrong_shape[key] = wrong_shape[key][:, :-1]
    torch.save(wrong_shape, tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"(?s)does not fit this UNet.*to_k"):
        load_fact_checkpoint(tmp_path / "shape.ckpt", copy.deepcopy(tiny_unet))
    wrong_norm = dict(state)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.ln.weight"
    wrong_norm[key] = torch.ones(7)
    torch.save(wrong_norm, tmp_path / "norm.ckpt")
    with pytest.raises(ValueError, match=r"(?s)does not fit this UNet.*ln.weight"):
        load_fact_checkpoint(tmp_path / "norm.ckpt", copy.deepcopy(tiny_unet))

    torch.save({k: v for k, v in state.items() if not k.startswith("local_fac_prj.")}, tmp_path / "noprj.ckpt")
    with pytest.raises(ValueError, match="face projection"):
        load_fact_checkpoint(tmp_path / "noprj.ckpt", copy.deepcopy(tiny_unet))

    torch.save({"weights": state, "optimizer": object.__new__(ResamplerConfig)}, tmp_path / "pickle.ckpt")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_fact_checkpoint(tmp_path / "pickle.ckpt", copy.deepcopy(tiny_unet))

    with pytest.raises(FileNotFoundError, match="FACT checkpoint not found"):
        load_fact_checkpoint(tmp_path / "nope.ckpt", tiny_unet)


def test_checkpoint_for_another_unet_is_rejected(official_file):
    from fact_lightning.tiny import tiny_base_model

    other = tiny_base_model(seed=0, cross_attention_dim=48).unet
    with pytest.raises(ValueError, match="does not fit|does not match"):
        load_fact_checkpoint(official_file, other)


def test_transface_loads_strictly_from_an_official_state_dict(tmp_path):
    encoder = build_transface("tiny", seed=4)
    torch.save(encoder.state_dict(), tmp_path / "transface.pt")
    arch = dict(img_size=112, patch_size=9, num_classes=64, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4, drop_path_rate=0.1)
    loaded = load_transface(tmp_path / "transface.pt", **arch)
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(faces), encoder(faces))
    assert not loaded.training
    with pytest.raises(ValueError, match="do not fit"):
        load_transface(tmp_path / "transface.pt", **{**arch, "depth": 3, "embed_dim": 32})
    with pytest.raises(ValueError, match="missing keys"):
        load_transface(tmp_path / "transface.pt", **{**arch, "depth": 3})
    with pytest.raises(FileNotFoundError, match="ms1mv2_model_TransFace_S.pt"):
        load_transface(tmp_path / "ms1mv2_model_TransFace_S.pt")


def test_keys_the_adapter_does_not_use_are_ignored_with_a_warning(tiny_unet, official_file, tmp_path, unet_inputs, caplog):
    """The official loader keeps only ``processor`` / ``local_fac_prj`` keys (non-strictly): extras must not stop us."""
    state = torch.load(official_file, weights_only=True)
    extras = {
        "some.other.weight": torch.zeros(1),
        "global_fac_prj.proj.weight": torch.zeros(3, 3),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q.weight": torch.zeros(2),
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor.extra_scale": torch.zeros(()),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.ln.running_mean": torch.zeros(64),
    }
    torch.save({**state, **extras}, tmp_path / "extra.ckpt")
    with caplog.at_level("WARNING", logger="fact_lightning.interop.official"):
        adapter = load_fact_checkpoint(tmp_path / "extra.ckpt", copy.deepcopy(tiny_unet))
    assert "ignoring 5 key(s)" in caplog.text and "some.other.weight" in caplog.text
    reference = load_fact_checkpoint(official_file, tiny_unet)
    assert adapter.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in adapter.state_dict().items())
    again = torch.load(export_fact_checkpoint(adapter, tmp_path / "again.ckpt"), weights_only=True)
    assert again.keys() == state.keys()  # the extras are not carried into our exports


def test_export_writes_norm2_at_the_base_precision_after_a_bf16_cast(tiny_unet, tmp_path):
    """A float32 base, attached, then frozen in bf16 (the training config): ``ln.*`` keeps the float32 values."""
    with torch.no_grad():  # norm2 values that bf16 cannot hold exactly
        for site in transformer_block_sites(tiny_unet):
            norm2 = tiny_unet.get_submodule(site.path).norm2
            norm2.weight.copy_(1 + 1e-3 * torch.randn_like(norm2.weight))
            norm2.bias.copy_(1e-3 * torch.randn_like(norm2.bias))
    torch.manual_seed(0)
    adapter = FaceAdapter.for_unet(tiny_unet, tiny_projection_config())
    fp32 = {f"{s.official_processor}.ln.{k}": v.clone() for s in adapter.sites
            for k, v in tiny_unet.get_submodule(s.path).norm2.state_dict().items()}
    tiny_unet.to(torch.bfloat16)
    assert tiny_unet.get_submodule(adapter.sites[0].path).norm2.weight.dtype == torch.bfloat16
    exported = torch.load(export_fact_checkpoint(adapter, tmp_path / "bf16.ckpt"), weights_only=True)
    assert len(fp32) == 32
    for key, value in fp32.items():
        assert exported[key].dtype == torch.float32 and torch.equal(exported[key], value), key
        assert not torch.equal(exported[key].bfloat16().float(), value)  # the bf16 UNet could not have given it
    # Reloaded on the bf16 UNet, the file's float32 values are remembered and exported again unchanged.
    adapter.detach()
    reloaded = load_fact_checkpoint(tmp_path / "bf16.ckpt", tiny_unet)
    again = torch.load(export_fact_checkpoint(reloaded, tmp_path / "again.ckpt"), weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in fp32.items())
    # A norm2 changed after attaching (not just cast) is exported as it now is.
    reloaded.detach()
    block = tiny_unet.get_submodule(adapter.sites[0].path)
    reloaded.attach(tiny_unet)
    with torch.no_grad():
        block.norm2.weight.fill_(2.0)
    changed = torch.load(export_fact_checkpoint(reloaded, tmp_path / "changed.ckpt"), weights_only=True)
    ln_weight = changed[f"{adapter.sites[0].official_processor}.ln.weight"]
    assert ln_weight.dtype == torch.bfloat16 and bool((ln_weight == 2.0).all())

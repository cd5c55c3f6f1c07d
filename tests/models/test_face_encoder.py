import pytest
import torch
import torch.nn.functional as F

from fact_lightning.models.face_encoder import TRANSFACE_VARIANTS, build_transface


def official_transface(state: dict, cfg, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TransFace's eval forward written from the official vit.py with raw tensors: (tokens, global embedding)."""
    b, d, h = faces.shape[0], cfg.embed_dim, cfg.num_heads
    x = F.conv2d(faces, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"]
    n = x.shape[1]
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        qkv = (y @ state[p + "attn.qkv.weight"].T).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
        attn = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        y = F.relu6(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    tokens = F.layer_norm(x.float(), (d,), state["norm.weight"], state["norm.bias"])
    flat = tokens.reshape(b, -1)
    gate = torch.sigmoid(F.relu(flat @ state["senet.0.weight"].T) @ state["senet.2.weight"].T)
    weighted = (tokens * gate.unsqueeze(-1)).reshape(b, -1)

    def bn(z, prefix):
        return F.batch_norm(z, state[prefix + "running_mean"], state[prefix + "running_var"],
                            state[prefix + "weight"], state[prefix + "bias"], training=False, eps=2e-5)

    emb = bn(weighted @ state["feature.0.weight"].T, "feature.1.")
    emb = bn(emb @ state["feature.2.weight"].T, "feature.3.")
    return tokens, emb


def _randomise_batchnorm(encoder):
    g = torch.Generator().manual_seed(1)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def test_tiny_encoder_matches_the_official_computation():
    encoder = build_transface("tiny", seed=3)
    _randomise_batchnorm(encoder)
    faces = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens, emb = official_transface(encoder.state_dict(), encoder.config, faces)
    with torch.no_grad():
        assert torch.allclose(encoder(faces), tokens, atol=1e-5)
        assert torch.allclose(encoder.embed(faces), emb, atol=1e-4)


def test_token_shapes_of_the_official_variant_s():
    cfg = TRANSFACE_VARIANTS["S"]
    assert (cfg.num_patches, cfg.embed_dim, cfg.depth, cfg.num_heads) == (144, 512, 12, 8)
    encoder = build_transface("tiny", seed=0)
    with torch.no_grad():
        out = encoder(torch.zeros(2, 3, 112, 112))
    assert out.shape == (2, 144, encoder.token_dim) and out.dtype == torch.float32


def test_seeded_builds_are_identical_and_seeds_differ():
    a, b, c = build_transface("tiny", seed=1), build_transface("tiny", seed=1), build_transface("tiny", seed=2)
    assert torch.equal(a.pos_embed, b.pos_embed)
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_wrong_face_size_and_unknown_variant_are_clear_errors():
    encoder = build_transface("tiny", seed=0)
    with pytest.raises(ValueError, match="112x112"):
        encoder(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="unknown TransFace variant"):
        build_transface("XXL")

import math

import pytest
import torch
import torch.nn.functional as F

from fact_lightning.models.resampler import PerceiverResampler, ResamplerConfig
from tests.conftest import tiny_projection_config


def official_resampler(state: dict, cfg: ResamplerConfig, x: torch.Tensor) -> torch.Tensor:
    """The official Face_Prj_Resampler forward, written from its description with raw tensors."""
    b = x.shape[0]
    x = F.linear(x, state["proj_in.weight"], state["proj_in.bias"])
    latents = state["latents"].repeat(b, 1, 1)
    for i in range(cfg.depth):
        p = f"layers.{i}.0."
        xn = F.layer_norm(x, (cfg.dim,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        ln = F.layer_norm(latents, (cfg.dim,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        q = ln @ state[p + "to_q.weight"].T
        k, v = (torch.cat([xn, ln], 1) @ state[p + "to_kv.weight"].T).chunk(2, -1)

        def heads(t):
            return t.view(b, t.shape[1], cfg.heads, -1).transpose(1, 2)

        scale = 1 / math.sqrt(math.sqrt(cfg.dim_head))  # split between q and k, as the release does
        w = torch.softmax((heads(q) * scale) @ (heads(k) * scale).transpose(-2, -1), -1)
        out = (w @ heads(v)).permute(0, 2, 1, 3).reshape(b, latents.shape[1], -1)
        latents = latents + out @ state[p + "to_out.weight"].T
        p = f"layers.{i}.1."
        y = F.layer_norm(latents, (cfg.dim,), state[p + "0.weight"], state[p + "0.bias"])
        latents = latents + F.gelu(y @ state[p + "1.weight"].T) @ state[p + "3.weight"].T
    out = F.linear(latents, state["proj_out.weight"], state["proj_out.bias"])
    return F.layer_norm(out, (cfg.output_dim,), state["norm_out.weight"], state["norm_out.bias"])


def test_matches_the_official_computation():
    torch.manual_seed(0)
    cfg = tiny_projection_config()
    prj = PerceiverResampler(cfg).eval()
    tokens = torch.randn(3, 144, cfg.token_dim)
    with torch.no_grad():
        assert torch.allclose(prj(tokens), official_resampler(prj.state_dict(), cfg, tokens), atol=1e-5)


def test_official_sizes_are_inferred_back_from_the_weights():
    official = ResamplerConfig()
    state = PerceiverResampler(official).state_dict()
    assert PerceiverResampler.config_from_state_dict(state) == official
    assert tuple(state["latents"].shape) == (1, 16, 1024)
    assert state["proj_out.weight"].shape == (768, 1024)


def test_output_shape_and_errors():
    cfg = tiny_projection_config()
    prj = PerceiverResampler(cfg)
    assert prj(torch.randn(2, 144, cfg.token_dim)).shape == (2, 16, 32)
    with pytest.raises(ValueError, match="width"):
        prj(torch.randn(2, 144, cfg.token_dim + 1))
    with pytest.raises(ValueError, match="not a perceiver-resampler"):
        PerceiverResampler.config_from_state_dict({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="positive"):
        ResamplerConfig(depth=0)

"""torch.compile traces a UNet with adapters as one graph: the condition routing has no graph breaks.

The ``eager`` backend keeps these tests free of a C compiler (dynamo's tracing, where graph breaks come
from, is the same for every backend).
"""

import pytest
import torch

from fact_lightning.models.injection import FaceAdapter
from tests.conftest import TINY_TOKEN_DIM, tiny_projection_config


@pytest.fixture
def adapted(tiny_unet):
    torch.manual_seed(0)
    adapter = FaceAdapter.for_unet(tiny_unet, tiny_projection_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.alpha_attn.copy_(0.5 + torch.rand((), generator=g))
            block.alpha_dense.copy_(0.5 + torch.rand((), generator=g))
        face = adapter.project(torch.randn(2, 144, TINY_TOKEN_DIM, generator=g))
    torch._dynamo.reset()
    yield tiny_unet, adapter, face
    torch._dynamo.reset()


def _unet_call(unet):
    def call(sample, timestep, text, kwargs):
        return unet(sample, timestep, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

    return call


def _args(unet_inputs):
    return unet_inputs["sample"], unet_inputs["timestep"], unet_inputs["encoder_hidden_states"]


@pytest.mark.slow
def test_a_unet_with_adapters_is_one_graph(adapted, unet_inputs):
    unet, adapter, face = adapted
    with torch.no_grad():
        explained = torch._dynamo.explain(_unet_call(unet))(*_args(unet_inputs), adapter.condition(face, 0.5))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow  # two dynamo traces of the whole UNet
def test_compiled_unet_matches_eager_in_inference_and_in_a_training_step(adapted, unet_inputs):
    """Also ``capture()`` (the FAIR records) and backward go through a ``fullgraph=True`` compile: no break."""
    unet, adapter, face = adapted
    with torch.no_grad():
        eager = _unet_call(unet)(*_args(unet_inputs), adapter.condition(face, 0.5))
        compiled = torch.compile(_unet_call(unet), backend="eager", fullgraph=True)
        assert torch.allclose(compiled(*_args(unet_inputs), adapter.condition(face, 0.5)), eager, atol=1e-5)
        assert (eager - unet(*_args(unet_inputs)).sample).abs().max() > 1e-3  # the adapters acted

    def step(call):
        adapter.zero_grad(set_to_none=True)
        with adapter.capture() as records:
            out = call(*_args(unet_inputs), adapter.condition(face, 1.0))
            loss = out.square().mean() + sum(inc.square().mean() for _, inc in records.values())
        loss.backward()
        return out.detach(), dict(records), {n: p.grad.clone() for n, p in adapter.blocks.named_parameters()}

    out_e, rec_e, grad_e = step(_unet_call(unet))
    out_c, rec_c, grad_c = step(torch.compile(_unet_call(unet), backend="eager", fullgraph=True))
    assert torch.allclose(out_c, out_e, atol=1e-5)
    assert list(rec_c) == list(rec_e) == [s.path for s in adapter.sites]
    assert all(torch.allclose(rec_c[k][1], rec_e[k][1], atol=1e-5) for k in rec_e)
    assert all(torch.allclose(grad_c[k], grad_e[k], atol=1e-5, rtol=1e-4) for k in grad_e)
    assert all(b.sink is None for b in adapter.blocks.values())

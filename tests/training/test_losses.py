"""FAIR and the masked diffusion loss on hand-made tensors."""

import math

import pytest
import torch

from fact_lightning.training import losses


def test_fair_matches_hand_computation():
    # 2x2 grid, 1 channel: the face is the top-left token.
    x = torch.tensor([[[1.0], [2.0], [2.0], [1.0]]])
    inc = torch.tensor([[[5.0], [3.0], [0.0], [4.0]]])
    mask = torch.tensor([[[1.0], [0.0], [0.0], [0.0]]])
    expected = math.sqrt(9 + 0 + 16) / math.sqrt(4 + 4 + 1)
    assert losses.fair(x, inc, mask).item() == pytest.approx(expected)


def test_fair_ignores_the_face_and_is_per_sample():
    x = torch.ones(2, 4, 3)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 4, 1).expand(2, 4, 1)
    inc = torch.zeros(2, 4, 3)
    inc[0, :2] = 100.0  # inside the face only: no penalty
    inc[1, 2:] = 1.0    # outside: |inc| = |x| there -> ratio 1
    assert losses.fair(x, inc, mask).tolist() == pytest.approx([0.0, 1.0])


def test_fair_denominator_takes_no_gradient():
    x = torch.randn(1, 4, 2, requires_grad=True)
    inc = torch.randn(1, 4, 2, requires_grad=True)
    losses.fair(x, inc, torch.zeros(1, 4, 1)).sum().backward()
    assert x.grad is None and inc.grad is not None


def test_mask_resized_to_each_block_grid():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1.0  # top-left quarter
    assert losses.token_grid(64, (8, 8)) == (8, 8)
    assert losses.token_grid(16, (8, 8)) == (4, 4)
    assert losses.token_grid(4, (8, 8)) == (2, 2)
    assert losses.token_grid(1, (7, 7)) == (1, 1)
    tokens = losses.mask_tokens(mask, (2, 2))
    assert tokens.shape == (1, 4, 1)
    assert tokens.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]  # row-major, like diffusers' token order
    assert losses.mask_tokens(mask, (1, 1)).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="tokens"):
        losses.token_grid(5, (8, 8))


def test_fair_per_block_uses_each_blocks_grid():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0  # top half is face
    records = {}
    for name, n in (("a", 16), ("b", 4)):
        x = torch.ones(1, n, 2)
        inc = torch.zeros(1, n, 2)
        inc[:, n // 2:] = 2.0  # bottom half (outside) gets 2x the input
        records[name] = (x, inc)
    out = losses.fair_per_block(records, mask, (4, 4))
    assert set(out) == {"a", "b"}
    assert out["a"].item() == pytest.approx(2.0) and out["b"].item() == pytest.approx(2.0)


def test_masked_diffusion_loss():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    target[:, :, 0, 0] = 3.0
    face = torch.zeros(2, 1, 2, 2)
    face[:, :, 0, 0] = 1.0
    weight = losses.random_loss_masks(face, torch.tensor([True, False]))
    assert weight[0].sum() == 1 and weight[1].sum() == 4
    # The paper's plain norm: the mean over all pixels. Masked sample: only the face pixel (9) of 4 pixels;
    # unmasked: the mean of 9, 1, 1, 1.
    assert losses.masked_diffusion_loss(pred, target, weight).tolist() == pytest.approx([9 / 4, 3.0])
    # Normalised by the mask area: the masked sample is its face pixel's error alone.
    assert losses.masked_diffusion_loss(pred, target, weight, "mask_area").tolist() == pytest.approx([9.0, 3.0])
    with pytest.raises(ValueError, match="normalize"):
        losses.masked_diffusion_loss(pred, target, weight, "face")


def test_increment_inside_outside():
    inc = torch.zeros(1, 4, 1)
    inc[0, 0] = 4.0
    inc[0, 1:] = 1.0
    mask = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1)
    inside, outside = losses.increment_inside_outside(inc, mask)
    assert inside.item() == pytest.approx(4.0) and outside.item() == pytest.approx(1.0)

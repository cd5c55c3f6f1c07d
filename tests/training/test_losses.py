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


def eq3(x: torch.Tensor, increment: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 3 written out by hand, sample by sample: sqrt(sum (GSA(x) (1 - M))^2) / sqrt(sum (x (1 - M))^2)."""
    values = []
    for b in range(x.shape[0]):
        outside = 1 - mask[b]
        values.append(torch.sqrt(((increment[b] * outside) ** 2).sum()) / torch.sqrt(((x[b] * outside) ** 2).sum()))
    return torch.stack(values)


def test_fair_value_and_gradient_are_eq3_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    inc = torch.randn(3, 16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 16, 1, generator=g, dtype=torch.float64) > 0.6).double()
    weights = torch.rand(3, generator=g, dtype=torch.float64)  # a generic upstream gradient
    ours = losses.fair(x, inc, mask, eps=0.0)
    grad_x, grad_inc = torch.autograd.grad((ours * weights).sum(), (x, inc))
    ref = eq3(x, inc, mask)
    ref_x, ref_inc = torch.autograd.grad((ref * weights).sum(), (x, inc))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_x, ref_x)  # the denominator is live: x takes Eq. 3's gradient
    torch.testing.assert_close(grad_inc, ref_inc)
    assert ref_x.abs().max() > 1e-3
    # The detached option: same value, no gradient into x.
    detached = losses.fair(x, inc, mask, eps=0.0, denominator="detached")
    torch.testing.assert_close(detached, ref)
    assert torch.autograd.grad(detached.sum(), x, allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="denominator"):
        losses.fair(x, inc, mask, denominator="frozen")


def test_a_block_all_inside_the_face_has_zero_fair_and_finite_gradients():
    # A coarse grid (the 1x1 mid block of a small crop) can be all face: 0/0 must not turn into NaN gradients.
    x = torch.randn(2, 1, 4, requires_grad=True)
    inc = torch.randn(2, 1, 4, requires_grad=True)
    value = losses.fair(x, inc, torch.ones(2, 1, 1))
    value.sum().backward()
    assert value.tolist() == [0.0, 0.0]
    assert torch.isfinite(x.grad).all() and torch.isfinite(inc.grad).all()


def test_fair_gradient_reaches_an_earlier_block_through_x():
    """Two blocks: the second one's input x is the first one's output, so the first block's weight gets FAIR's
    gradient through the second block's denominator too, as autograd of a hand-written Eq. 3 gives it."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 4, generator=g, dtype=torch.float64)
    w1 = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)  # block 1's adapter
    w2 = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)  # block 2's adapter
    face = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    face[..., 4:12, 2:10] = 1.0

    def forward():
        inc1 = torch.tanh(x0 @ w1)
        x1 = x0 + inc1  # block 2's input: depends on w1
        inc2 = 0.5 * torch.tanh(x1 @ w2)
        return {"block1": (x0, inc1), "block2": (x1, inc2)}

    records = forward()
    ours = sum(v.sum() for v in losses.fair_per_block(records, face, (4, 4)).values())
    ours_w1, ours_w2 = torch.autograd.grad(ours, (w1, w2))
    records = forward()
    mask = losses.mask_tokens(face, (4, 4))
    ref = sum(eq3(x, inc, mask).sum() for x, inc in records.values())
    ref_w1, ref_w2 = torch.autograd.grad(ref, (w1, w2))
    torch.testing.assert_close(ours_w1, ref_w1, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours_w2, ref_w2, rtol=1e-6, atol=1e-9)
    # Detaching x would drop the block-2 denominator's share of w1's gradient: a different gradient.
    records = forward()
    detached = sum(v.sum() for v in losses.fair_per_block(records, face, (4, 4), "detached").values())
    detached_w1 = torch.autograd.grad(detached, w1)[0]
    assert (detached_w1 - ref_w1).norm() > 1e-3 * ref_w1.norm()


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
    assert losses.mask_tokens(mask, (1, 1)).item() == 0.0  # a quarter face: the cell is outside
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


def soft_disc(size: int = 64) -> torch.Tensor:
    """A face mask with soft edges, as a bilinear resize leaves it: 1 inside a disc, a 0..1 ramp across its rim."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r = ((yy - 0.45 * size) ** 2 + (xx - 0.55 * size) ** 2).sqrt()
    return (0.3 * size - r).div(3.0).add(0.5).clamp(0, 1).view(1, 1, size, size)


def test_face_region_is_binary_where_area_resizing_is_fractional():
    mask = soft_disc()
    area = torch.nn.functional.interpolate(mask, size=(8, 8), mode="area")
    fractional = ((area > 0) & (area < 1)).float().mean()
    assert fractional > 0.1  # the rim: many latent cells only partly face
    region = losses.face_region(mask, (8, 8))
    assert set(region.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(region, (area >= 0.5).float())  # a cell is face when at least half of it is
    assert torch.equal(losses.mask_tokens(mask, (8, 8)), region.flatten(2).transpose(1, 2))


def test_masked_loss_squares_the_masked_difference():
    """Eq. 4: ||(eps_pred - eps) * M||^2. The training mask is the binary face region (M^2 = M); a soft mask
    would count M^2, not M."""
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    diff2 = (pred - target) ** 2
    region = losses.face_region(soft_disc().expand(2, 1, 64, 64), (8, 8))
    weight = losses.random_loss_masks(region, torch.tensor([True, False]))
    loss = losses.masked_diffusion_loss(pred, target, weight)
    face = region[0].bool().expand(4, 8, 8)
    assert loss[0].item() == pytest.approx(diff2[0][face].sum().item() / diff2[0].numel())  # the face only
    assert loss[1].item() == pytest.approx(diff2[1].mean().item())  # M_r = 1
    per_area = losses.masked_diffusion_loss(pred, target, weight, "mask_area")
    assert per_area[0].item() == pytest.approx(diff2[0][face].mean().item())
    soft = torch.nn.functional.interpolate(soft_disc(), size=(8, 8), mode="area").expand(2, 1, 8, 8)
    assert losses.masked_diffusion_loss(pred, target, soft).tolist() == pytest.approx(
        (diff2 * soft**2).mean(dim=(1, 2, 3)).tolist())


def test_increment_inside_outside():
    inc = torch.zeros(1, 4, 1)
    inc[0, 0] = 4.0
    inc[0, 1:] = 1.0
    mask = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1)
    inside, outside = losses.increment_inside_outside(inc, mask)
    assert inside.item() == pytest.approx(4.0) and outside.item() == pytest.approx(1.0)

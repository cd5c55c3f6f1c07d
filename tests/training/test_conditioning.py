"""Seeded per-sample decisions: fractions near the configured probabilities, independent of batch layout."""

import pytest
import torch

from fact_lightning.training.conditioning import (
    ConditionProbabilities, FaceChoice, decide, draw_normal, sample_generators, sample_seed,
)


def test_fractions_near_probabilities():
    keys = [f"g{i}/00" for i in range(4000)]
    probs = ConditionProbabilities(p_shuffle=0.4, face_drop=0.1, text_drop=0.1, mask_loss=0.5)
    d = decide(sample_generators(7, 3, keys), probs)
    f = d.fractions()
    assert f["dropped"] == pytest.approx(0.1, abs=0.02)
    assert f["shuffled"] == pytest.approx(0.9 * 0.4, abs=0.025)
    assert f["paired"] == pytest.approx(1 - 0.1 - 0.36, abs=0.025)
    assert f["text_dropped"] == pytest.approx(0.1, abs=0.02)
    assert d.use_mask.float().mean().item() == pytest.approx(0.5, abs=0.03)
    # face and text drops are independent
    both = ((d.face == FaceChoice.DROPPED) & d.drop_text).float().mean().item()
    assert both == pytest.approx(0.01, abs=0.006)


def test_decisions_are_per_sample_not_per_batch_layout():
    keys = [f"k{i}" for i in range(8)]
    probs = ConditionProbabilities(p_shuffle=0.5)
    whole = decide(sample_generators(0, 5, keys), probs)
    halves = [decide(sample_generators(0, 5, keys[i::2]), probs) for i in (0, 1)]
    assert torch.equal(whole.face[0::2], halves[0].face) and torch.equal(whole.face[1::2], halves[1].face)
    noise = draw_normal(sample_generators(0, 5, keys[:2]), (2, 2))
    assert torch.equal(noise[1], draw_normal(sample_generators(0, 5, keys[1:2]), (2, 2))[0])


def test_seed_step_and_key_all_matter():
    base = sample_seed(0, 1, "a")
    assert base == sample_seed(0, 1, "a")
    assert len({base, sample_seed(1, 1, "a"), sample_seed(0, 2, "a"), sample_seed(0, 1, "b")}) == 4


def test_shuffle_needs_another_image():
    keys = [f"k{i}" for i in range(200)]
    d = decide(sample_generators(0, 0, keys), ConditionProbabilities(p_shuffle=1.0, face_drop=0.0),
               shuffle_available=torch.zeros(200, dtype=torch.bool))
    assert (d.face == FaceChoice.PAIRED).all()


def test_probabilities_validated():
    with pytest.raises(ValueError, match="p_shuffle"):
        ConditionProbabilities(p_shuffle=1.5)


def test_joint_drop_drops_both_and_is_off_by_default():
    keys = [f"g{i}/00" for i in range(4000)]
    plain = decide(sample_generators(7, 3, keys), ConditionProbabilities())
    joint = decide(sample_generators(7, 3, keys), ConditionProbabilities(joint_drop=0.1))
    both = lambda d: ((d.face == FaceChoice.DROPPED) & d.drop_text).float().mean().item()  # noqa: E731
    assert both(plain) == pytest.approx(0.01, abs=0.006)
    # joint 0.1 on top of independent 0.1/0.1: P(both) = 0.1 + 0.9 * 0.01
    assert both(joint) == pytest.approx(0.109, abs=0.02)
    # the option off draws nothing extra: the noise that follows is the one a run without the option sees
    a, b = sample_generators(7, 3, keys[:1]), sample_generators(7, 3, keys[:1])
    decide(a, ConditionProbabilities(joint_drop=0.0))
    decide(b, ConditionProbabilities())
    assert torch.equal(draw_normal(a, (3,)), draw_normal(b, (3,)))

"""The shuffle curriculum is one schedule object: values over the steps, and its validation."""

import pytest

from fact_lightning.training.conditioning import ShuffleSchedule


def test_linear_ramp_values():
    s = ShuffleSchedule(start=0.2, end=0.6, ramp_steps=100)
    assert [s.value(t) for t in (0, 25, 50, 100, 1000)] == pytest.approx([0.2, 0.3, 0.4, 0.6, 0.6])


def test_warmup_and_cosine():
    s = ShuffleSchedule(start=0.2, end=0.6, ramp_steps=100, warmup_steps=10, shape="cosine")
    assert s.value(5) == pytest.approx(0.2) and s.value(60) == pytest.approx(0.4) and s.value(110) == pytest.approx(0.6)
    assert ShuffleSchedule(ramp_steps=0).value(0) == pytest.approx(0.6)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="end"):
        ShuffleSchedule(end=1.2)
    with pytest.raises(ValueError, match="ramp_steps"):
        ShuffleSchedule(ramp_steps=-1)
    with pytest.raises(ValueError, match="shape"):
        ShuffleSchedule(shape="step")


def test_an_unset_ramp_ends_with_the_run_and_an_explicit_one_wins():
    s = ShuffleSchedule(start=0.2, end=0.6)
    assert s.ramp_steps is None and s.value(0) == pytest.approx(0.2)  # the start needs no run length
    with pytest.raises(ValueError, match="resolve"):
        s.value(1)
    run = s.resolve(400)
    assert run.ramp_steps == 400 and run.ramp_end == 400 and run.value(200) == pytest.approx(0.4)
    warm = ShuffleSchedule(warmup_steps=100).resolve(400)
    assert warm.ramp_steps == 300 and warm.ramp_end == 400
    fixed = ShuffleSchedule(ramp_steps=50)
    assert fixed.resolve(400) is fixed and fixed.ramp_end == 50

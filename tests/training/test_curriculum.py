import pytest

from fact_lightning.callbacks.curriculum import ShuffleCurriculum


def test_linear_ramp_values():
    c = ShuffleCurriculum(start=0.2, end=0.6, ramp_steps=100)
    assert [c.value(s) for s in (0, 25, 50, 100, 1000)] == pytest.approx([0.2, 0.3, 0.4, 0.6, 0.6])


def test_warmup_and_cosine():
    c = ShuffleCurriculum(start=0.2, end=0.6, ramp_steps=100, warmup_steps=10, schedule="cosine")
    assert c.value(5) == pytest.approx(0.2) and c.value(60) == pytest.approx(0.4) and c.value(110) == pytest.approx(0.6)
    assert ShuffleCurriculum(ramp_steps=0).value(0) == pytest.approx(0.6)


def test_state_round_trip():
    c = ShuffleCurriculum(ramp_steps=10)
    c.step, c.p_shuffle = 4, c.value(4)
    d = ShuffleCurriculum(ramp_steps=10)
    d.load_state_dict(c.state_dict())
    assert (d.step, d.p_shuffle) == (4, pytest.approx(0.36))


def test_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="end"):
        ShuffleCurriculum(end=1.2)

"""What a resume may change (training/resume.py): the optimizer's configured settings win over the restored
param groups (the scheduler's place kept), and what a restore would silently override is refused by name."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fact_lightning.training import resume
from fact_lightning.training.resume import ResumeRefused


def _trained(optimizer_factory, scheduler_factory=None, steps=2):
    """A checkpoint's optimizer part after ``steps`` steps of a one-parameter model."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizer_factory([param])
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    for _ in range(steps):
        param.grad = torch.ones(3)
        optimizer.step()
        if scheduler:
            scheduler.step()
    checkpoint = {"optimizer_states": [optimizer.state_dict()],
                  "lr_schedulers": [scheduler.state_dict()] if scheduler else [],
                  "fact": {"optimizer": resume.class_path(optimizer),
                           "lr_scheduler": resume.class_path(scheduler) if scheduler else None}}
    return checkpoint, param


def _resumed(checkpoint, param, optimizer_factory, scheduler_factory=None):
    """As Lightning resumes: configure fresh, then load the checkpoint's states over it."""
    optimizer = optimizer_factory([param])
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    configured = (resume.settings(optimizer), list(scheduler.base_lrs) if scheduler else None)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    if scheduler:
        scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    return optimizer, scheduler, configured


def test_changed_optimizer_settings_are_applied_over_the_restored_groups():
    old = partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    new = partial(torch.optim.AdamW, lr=5e-4, betas=(0.8, 0.99), weight_decay=0.01)
    checkpoint, param = _trained(old)
    assert [c[0] for c in resume.refuse_optimizer_changes(checkpoint, new, None)] == \
        ["model.optimizer.betas", "model.optimizer.lr"]
    optimizer, _, configured = _resumed(checkpoint, param, new)
    assert optimizer.param_groups[0]["lr"] == 1e-3  # what the restore did: the checkpoint's settings
    changes = resume.apply_optimizer_settings(optimizer, None, *configured)
    assert {name for name, *_ in changes} == {"lr", "betas"}
    assert optimizer.param_groups[0]["lr"] == 5e-4 and optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    assert int(optimizer.state[param]["step"]) == 2  # the moments stay


def test_a_changed_lr_moves_the_schedule_base_and_keeps_its_place():
    scheduler = partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5, total_iters=4)
    checkpoint, param = _trained(partial(torch.optim.SGD, lr=1e-2), scheduler)
    new = partial(torch.optim.SGD, lr=2e-2)
    assert resume.refuse_optimizer_changes(checkpoint, new, scheduler) == [("model.optimizer.lr", 1e-2, 2e-2)]
    optimizer, restored, configured = _resumed(checkpoint, param, new, scheduler)
    resume.apply_optimizer_settings(optimizer, restored, *configured)
    fresh_checkpoint, _ = _trained(new, scheduler)  # a run configured with 2e-2 from the start, at the same step
    want = fresh_checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(want)
    restored.step()
    assert restored.base_lrs == [2e-2] and optimizer.param_groups[0]["lr"] == pytest.approx(2e-2 * 0.875)


@pytest.mark.parametrize("new_scheduler,words", [
    (partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5, total_iters=8),
     ["model.lr_scheduler.total_iters", "8", "4"]),
    (partial(torch.optim.lr_scheduler.StepLR, step_size=2), ["StepLR", "LinearLR"]),
    (None, ["model.lr_scheduler", "none", "LinearLR"]),
], ids=["setting", "class", "removed"])
def test_scheduler_changes_a_restore_would_override_are_refused(new_scheduler, words):
    old = partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5, total_iters=4)
    checkpoint, _ = _trained(partial(torch.optim.SGD, lr=1e-2), old)
    with pytest.raises(ResumeRefused) as refused:
        resume.refuse_optimizer_changes(checkpoint, partial(torch.optim.SGD, lr=1e-2), new_scheduler)
    for word in words:
        assert word in str(refused.value)


def test_another_optimizer_class_is_refused_even_without_a_recorded_class():
    checkpoint, _ = _trained(partial(torch.optim.Adam, lr=1e-3))
    del checkpoint["fact"]  # an older checkpoint: the settings' names tell the classes apart
    with pytest.raises(ResumeRefused, match="model.optimizer is torch.optim.sgd.SGD"):
        resume.refuse_optimizer_changes(checkpoint, partial(torch.optim.SGD, lr=1e-3), None)


def test_model_shape_options_are_refused_and_the_others_applied():
    saved = {"projection": {"dim": 64, "depth": 2}, "adapter_dtype": "float32", "fair_weight": 0.01, "_instantiator": "x"}
    assert resume.refuse_model_changes(saved, {**saved, "fair_weight": 0.02, "new_option": 1}) == \
        [("model.fair_weight", 0.01, 0.02)]
    with pytest.raises(ResumeRefused, match=r"model.projection.depth is 4 but the checkpoint was trained with 2"):
        resume.refuse_model_changes(saved, {**saved, "projection": {"dim": 64, "depth": 4}})
    with pytest.raises(ResumeRefused, match="model.adapter_dtype is 'float64'"):
        resume.refuse_model_changes(saved, {**saved, "adapter_dtype": "float64"})

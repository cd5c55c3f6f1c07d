"""Preemption and resume lose nothing: a signal stops a fit at the next optimizer step with a checkpoint of it
and exit status 128 + N; a second one stops at once; the resumed run ends bit-identical to an uninterrupted one
(gradient accumulation 2 included, the signal arriving mid-window)."""

from __future__ import annotations

import signal

import pytest

from fact_lightning.training.checkpoints import resolve_last
from tests.training.runs import callback, final_adapter, fit_here, leftovers, same_weights, step_of, write_config

FAULTS = "tests.training.faults.SignalAt"
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def config(shards, tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("config"), shards, steps=4)


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "straight"
    assert fit_here(config, run) == 0
    return final_adapter(run)


def test_sigterm_mid_window_saves_the_next_step_and_the_resume_is_exact(config, uninterrupted, tmp_path, caplog):
    run = tmp_path / "run"
    # Step 3's window is [batch 6, batch 7]; the signal lands after batch 6, inside it (4 steps, every 2 saved).
    code = fit_here(config, run, callback(FAULTS, point="micro-batch", step=2, signal="SIGTERM"))
    assert code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 3" in caplog.text
    assert step_of(run / "checkpoints" / "last.ckpt") == 3  # the boundary after the signal, not step 2
    assert not (run / "adapters" / "final").exists()  # a stopped run is not a finished one
    assert fit_here(config, run, "--ckpt_path", "last") == 0
    assert same_weights(final_adapter(run), uninterrupted)
    assert not leftovers(run)


@pytest.mark.parametrize("name", ["SIGINT", "SIGUSR1", "SIGHUP"])
def test_ctrl_c_sigusr1_and_sighup_stop_at_a_step_with_a_checkpoint(config, tmp_path, name):
    run = tmp_path / "run"
    code = fit_here(config, run, callback(FAULTS, point="micro-batch", step=0, signal=name))
    assert code == 128 + signal.Signals[name]
    assert step_of(resolve_last(run / "checkpoints")) == 1


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(config, tmp_path, caplog):
    run = tmp_path / "run"
    code = fit_here(config, run, callback(FAULTS, point="micro-batch", step=2, signal="SIGINT", times=2))
    assert code == 128 + signal.SIGINT
    assert "again: stopping now" in caplog.text
    assert step_of(run / "checkpoints" / "last.ckpt") == 2  # the scheduled save only; no step 3
    assert not leftovers(run)


def test_sigterm_inside_a_checkpoint_save_lets_it_finish_then_stops(config, uninterrupted, tmp_path):
    run = tmp_path / "run"
    code = fit_here(config, run, callback(FAULTS, point="checkpoint", step=2, signal="SIGTERM"))
    assert code == 128 + signal.SIGTERM
    assert step_of(run / "checkpoints" / "last.ckpt") == 3  # step 2's save completed; stopped after step 3
    assert not leftovers(run)
    assert fit_here(config, run, "--ckpt_path", "last") == 0
    assert same_weights(final_adapter(run), uninterrupted)

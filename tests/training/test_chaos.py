"""Chaos: the real `fact-train` is killed (SIGKILL) or stopped (SIGTERM) at one moment of its life after
another (inside an accumulation window, inside a checkpoint write, inside a step export and the final
export), resumed each time with ``--ckpt_path last``, and its final adapter is identical to an
uninterrupted run's (its tensors bit for bit and its metadata; safetensors orders the metadata keys of a
file at random). A seed picks the kill step and how much of each killed write reached the disk."""

from __future__ import annotations

import random
import signal

import pytest

from fact_lightning.models.adapter_io import read_adapter_metadata
from fact_lightning.training.checkpoints import is_intact, resolve_last
from tests.training.runs import (callback, fact_train, final_adapter, fit_here, leftovers, same_weights, step_of,
                                write_config)

FAULTS = "tests.training.faults.SignalAt"
KILLED, TERMINATED, STOPPED = -signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM


def plan(seed: int) -> list[tuple[dict, int]]:
    """(where the fault strikes, the exit status it must end the launch with), in the order of a 6-step run."""
    rng = random.Random(seed)
    cut = lambda: round(rng.uniform(0.05, 0.95), 2)  # noqa: E731
    return [
        (dict(point="micro-batch", step=rng.choice([2, 3]), signal="SIGKILL"), KILLED),
        # A signal during step 4's save: the save completes, the fit stops at the next step with its checkpoint.
        (dict(point="checkpoint", step=4, signal="SIGTERM"), STOPPED),
        (dict(point="export", name="step-000006", signal="SIGKILL", cut=cut()), KILLED),
        (dict(point="checkpoint", step=6, signal="SIGKILL", cut=cut()), KILLED),
        (dict(point="export", name="final", signal="SIGKILL", cut=cut()), KILLED),
        # Nothing left to train: the resume only owes the final export, and SIGTERM there ends it at once.
        (dict(point="export", name="final", signal="SIGTERM"), TERMINATED),
        (None, 0),
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [0])
def test_kills_at_every_moment_then_resume_give_the_uninterrupted_adapter(shards, tmp_path, seed):
    config = write_config(tmp_path, shards, steps=6)
    assert fit_here(config, tmp_path / "straight") == 0  # the reference: the same program, in this process
    want = final_adapter(tmp_path / "straight")
    want_meta = read_adapter_metadata(tmp_path / "straight" / "adapters" / "final" / "adapter.safetensors")

    run, history = tmp_path / "run", []
    for fault, status in plan(seed):
        args = [callback(FAULTS, **fault)] if fault else []
        if (run / "checkpoints").is_dir():
            args += ["--ckpt_path", "last"]
        done = fact_train(config, run, *args)
        history.append((fault, done.returncode))
        assert done.returncode == status, (history, done.stderr[-3000:])
        checkpoints = run / "checkpoints"
        assert not [p.name for p in checkpoints.iterdir() if "-v" in p.name]  # "last" is never versioned
        assert is_intact(resolve_last(checkpoints))  # whatever died, a resume finds an intact newest step
        final = run / "adapters" / "final"
        assert not final.exists() or (final / "adapter.safetensors").is_file()  # absent or whole, never partial
    assert step_of(run / "checkpoints" / "last.ckpt") == 6
    assert same_weights(final_adapter(run), want)
    assert read_adapter_metadata(run / "adapters" / "final" / "adapter.safetensors") == want_meta
    assert not leftovers(run)

"""`fact-train` as a user meets it: one-line errors with exit 2, resume that finds an intact checkpoint, and
checkpoint files that survive a kill -9 in the middle of a save."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fact_lightning.errors import UserError
from fact_lightning.training.checkpoints import AtomicCheckpointIO, is_intact, resolve_last
from tests.training.faults import save_forever

ROOT = Path(__file__).parents[2]
FACT_TRAIN = str(Path(sys.executable).parent / "fact-train")
TINY = str(ROOT / "configs" / "tiny.yaml")


def fact_train(*args: str, cwd: Path | None = None, timeout: int = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FACT_TRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]


def test_missing_shards_folder_is_one_line_and_leaves_no_run_folder(tmp_path):
    run = tmp_path / "run"
    done = fact_train("fit", "--config", TINY, "--data.root", str(tmp_path / "nowhere"),
                      "--trainer.default_root_dir", str(run))
    _one_line_error(done, "manifest.json", "nowhere")
    assert not run.exists()  # a launch that fails before training leaves nothing behind


def test_encoder_mismatch_is_one_line(shards, tmp_path):
    done = fact_train("fit", "--config", TINY, "--data.root", str(shards), "--data.encoder", "S",
                      "--trainer.default_root_dir", str(tmp_path / "run"))
    _one_line_error(done, "encoder")


def test_missing_base_weights_is_one_line(shards, tmp_path):
    done = fact_train("fit", "--config", TINY, "--data.root", str(shards), "--data.resolution", "64",
                      "--model.base", "fact_lightning.training.base_spec.PretrainedBase",
                      "--model.base.source", str(tmp_path / "no_sd15"), "--trainer.default_root_dir", str(tmp_path / "r"))
    _one_line_error(done, "no_sd15")


def test_gpu_config_without_gpu_is_one_line(shards, tmp_path):
    done = fact_train("fit", "--config", TINY, "--trainer.accelerator", "gpu", "--data.root", str(shards),
                      "--trainer.default_root_dir", str(tmp_path / "run"),
                      env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU visible, also on a machine that has one
    _one_line_error(done)


def test_only_runnable_subcommands_are_offered():
    done = fact_train("test", "--config", TINY)
    assert done.returncode == 2 and "invalid choice" in done.stderr
    assert "{fit,validate}" in fact_train("--help").stdout


def test_resume_last_without_checkpoint_says_so(shards, tmp_path):
    done = fact_train("fit", "--config", TINY, "--data.root", str(shards), "--data.resolution", "64",
                      "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", "last")
    _one_line_error(done, "no checkpoint")


def _fake_checkpoint(path: Path, step: int) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.zeros(4)}, path)


def test_damaged_last_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    _fake_checkpoint(tmp_path / "step=2.ckpt", 2)
    time.sleep(0.01)
    _fake_checkpoint(tmp_path / "step=4.ckpt", 4)
    _fake_checkpoint(tmp_path / "last.ckpt", 4)
    assert resolve_last(tmp_path) == tmp_path / "last.ckpt"
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # a save cut in half
    assert resolve_last(tmp_path) == tmp_path / "step=4.ckpt"
    assert "damaged" in caplog.text
    (tmp_path / "step=4.ckpt").write_bytes(b"")
    assert resolve_last(tmp_path) == tmp_path / "step=2.ckpt"
    (tmp_path / "step=2.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="damaged"):
        resolve_last(tmp_path)


def test_kill_9_during_saves_never_leaves_a_broken_last_ckpt(tmp_path):
    """With TMPDIR on another filesystem (/dev/shm), a kill at any moment leaves the old or the new file.

    Each saver is a real process killed with SIGKILL; they are forked from one forkserver that imported the
    writer once (an interpreter start and Lightning's import per kill would be most of the test's time)."""
    path = tmp_path / "last.ckpt"
    tmpdir = "/dev/shm" if Path("/dev/shm").is_dir() else str(tmp_path)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.training.faults"])  # effective if this process has no forkserver yet
    for delay in (0.3, 0.7, 1.1):
        steps, sender = context.Pipe(duplex=False)
        saver = context.Process(target=save_forever, args=(str(path), sender, tmpdir), daemon=True)
        saver.start()
        sender.close()
        try:
            assert steps.poll(120) and steps.recv() >= 1  # at least one complete save
            time.sleep(delay)
        finally:
            saver.kill()
            saver.join(timeout=30)
        assert saver.exitcode == -signal.SIGKILL
        assert is_intact(path)
        saved = torch.load(path, weights_only=True)
        assert saved["w"].eq(float(saved["global_step"])).all()
    _fake_checkpoint(path, 0)  # the next save clears what a killed one left behind
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_resume_last_continues_the_same_run_and_curves(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = ["fit", "--config", TINY, "--data.root", str(shards), "--trainer.default_root_dir", str(run),
              "--trainer.log_every_n_steps", "1"]
    first = fact_train(*common, "--trainer.max_steps", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    second = fact_train(*common, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert not [p for p in run.iterdir() if p.name.startswith(("version_", "lightning_logs"))]
    events = EventAccumulator(str(run))
    events.Reload()
    steps = sorted({e.step for e in events.Scalars("train/diffusion")})
    assert steps == [0, 1, 2, 3, 4]  # one curve over both launches, in the run folder itself


@pytest.mark.parametrize("mistake,named", [(["--model.fair_weigth", "0.1"], "fair_weigth"),
                                           (["--model.fair_weight", "abc"], "model.fair_weight"),
                                           (["--config", "/nonexistent/fact.yaml"], "/nonexistent/fact.yaml")])
def test_a_config_mistake_is_one_line_and_a_pointer_to_help(shards, tmp_path, mistake, named):
    """A typo in a key, a wrong type, a missing config file: not the ~95 lines of usage before the error."""
    done = fact_train("fit", "--config", TINY, "--data.root", str(shards), "--trainer.default_root_dir",
                      str(tmp_path / "run"), *mistake)
    _one_line_error(done, named)
    assert done.stderr.strip().splitlines()[1:] == ["(see fact-train fit --help)"], done.stderr
    assert not (tmp_path / "run").exists()


def test_validate_without_validation_data_names_data_val_root(shards, tmp_path):
    done = fact_train("validate", "--config", TINY, "--data.root", str(shards), "--trainer.default_root_dir",
                      str(tmp_path / "run"))
    _one_line_error(done, "data.val_root")

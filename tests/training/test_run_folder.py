"""A run has one owner, and its folder is the truth: the lock, ``--ckpt_path last`` by step, the last step
always saved and exported, files that are not checkpoints, and resumes with changed options."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from fact_lightning.errors import UserError
from fact_lightning.files import FolderBusy, locked_folder
from fact_lightning.models.adapter_io import read_adapter_metadata
from fact_lightning.training.checkpoints import AtomicCheckpointIO, resolve_last

from tests.training.runs import error_lines, final_adapter, fit_here, leftovers, same_weights, step_of, write_config

LOCK = ".fact-train.lock"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def config(shards, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("config"), shards, steps=3)


@pytest.fixture(scope="module")
def done_run(config, tmp_path_factory) -> Path:
    """A finished run of 3 steps (checkpoints every 2): the folder the other tests resume, copy and damage."""
    run = tmp_path_factory.mktemp("runs") / "done"
    assert fit_here(config, run) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _one_error(code: int, stderr: str, *words: str) -> str:
    assert code == 2, stderr[-2000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- one owner ------------------------------------------------------------------------------------------
def test_a_second_fit_into_a_held_run_folder_stops_with_one_line(config, tmp_path, capsys):
    run = tmp_path / "run"
    with locked_folder(run, LOCK):  # as a running fit holds it (flock: per open file, so also in one process)
        code = fit_here(config, run)
    _one_error(code, capsys.readouterr().err, "another fact-train", f"pid {os.getpid()}", str(run))
    assert sorted(p.name for p in run.iterdir()) == [LOCK]  # it wrote nothing: no config.yaml, no checkpoint


HOLDER = textwrap.dedent("""
    import sys, time
    from fact_lightning.files import locked_folder
    with locked_folder(sys.argv[1], ".fact-train.lock"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_checkpoint_folder_outside_the_run_folder_has_one_owner_too(shards, tmp_path, capsys):
    shared = tmp_path / "shared-checkpoints"
    config = write_config(tmp_path, shards, steps=3)
    config.write_text(config.read_text().replace("every_n_train_steps: 2,", f"every_n_train_steps: 2, dirpath: {shared},"))
    with locked_folder(shared, LOCK):  # another run, with its own run folder, writes its checkpoints there
        code = fit_here(config, tmp_path / "run")
    _one_error(code, capsys.readouterr().err, "another fact-train", str(shared))


def test_the_lock_dies_with_its_holder_even_on_sigkill(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"process {holder.pid}"):
            with locked_folder(run, LOCK):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with locked_folder(run, LOCK):  # the stale lock file does not block the next owner
        assert (run / LOCK).read_text().strip() == str(os.getpid())


def test_a_launch_that_fails_before_writing_leaves_no_folder(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(ValueError):
        with locked_folder(run, LOCK):
            raise ValueError("bad data")
    assert not run.exists()


@pytest.mark.parametrize("env,zero", [({}, True), ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1"}, False),
                                      ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x",
                                        "MASTER_PORT": "1", "GROUP_RANK": "0"}, True)])
def test_only_the_jobs_rank_zero_takes_the_lock(monkeypatch, env, zero):
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment

    from fact_lightning.cli import FactCLI

    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli = SimpleNamespace(trainer=SimpleNamespace(strategy=SimpleNamespace(cluster_environment=LightningEnvironment())))
    assert FactCLI._is_launching_rank_zero(cli) is zero


# --- "last" is the newest step, whatever the names -------------------------------------------------------
def _fake(path: Path, step: int, batches: int = 0) -> None:
    loops = {"fit_loop": {"epoch_loop.batch_progress": {"total": {"processed": batches}}}}
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "epoch": 0, "state_dict": {}, "loops": loops}, path)


def test_last_is_the_newest_intact_step_not_the_newest_name(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    _fake(folder / "last-v1.ckpt", 6)  # what a resume after a move wrote beside ...
    time.sleep(0.02)
    _fake(folder / "last.ckpt", 4)  # ... a stale last.ckpt (newer on disk: copied last)
    _fake(folder / "epoch=0-step=2.ckpt", 2)
    assert resolve_last(folder) == folder / "last-v1.ckpt"
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    _fake(hpc, 7)  # Lightning's SLURM requeue save counts too
    assert resolve_last(folder, extra=[hpc]) == hpc
    copied = tmp_path / "copied"
    shutil.copytree(folder, copied)  # a copy: every mtime new, in any order
    assert resolve_last(copied) == copied / "last-v1.ckpt"
    data = (copied / "last-v1.ckpt").read_bytes()
    (copied / "last-v1.ckpt").write_bytes(data[: len(data) // 3])  # the newest save cut short
    assert resolve_last(copied) == copied / "last.ckpt"
    assert "damaged" in caplog.text
    _fake(copied / "last.ckpt", 6, batches=12)  # the same step saved twice: the one further on wins
    _fake(copied / "epoch=1-step=6.ckpt", 6, batches=11)
    assert resolve_last(copied) == copied / "last.ckpt"
    for path in copied.iterdir():
        path.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="every checkpoint .* is damaged"):
        resolve_last(copied)


def test_a_moved_run_resumes_its_newest_step_and_never_versions_last(config, done_run, tmp_path):
    moved = _copy(done_run, tmp_path)  # the checkpoints remember the old folder
    assert fit_here(config, moved, "--ckpt_path", "last", "--trainer.max_steps", "5") == 0
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert not [n for n in names if "-v" in n], names
    assert step_of(moved / "checkpoints" / "last.ckpt") == 5
    assert resolve_last(moved / "checkpoints") == moved / "checkpoints" / "last.ckpt"
    assert read_adapter_metadata(moved / "adapters" / "final" / "adapter.safetensors")["step"] == "5"


# --- the last step is always saved and exported ----------------------------------------------------------
def test_the_last_step_is_checkpointed_and_exported_off_schedule(done_run):
    # 3 steps, checkpoints every 2: Lightning alone left last.ckpt at step 2.
    assert step_of(done_run / "checkpoints" / "last.ckpt") == 3
    assert (done_run / "adapters" / "step-000003" / "adapter.safetensors").is_file()
    assert read_adapter_metadata(done_run / "adapters" / "final" / "adapter.safetensors")["step"] == "3"
    assert not leftovers(done_run)


def test_a_run_killed_during_its_final_export_exports_it_on_resume(config, done_run, tmp_path):
    run = _copy(done_run, tmp_path)
    want = final_adapter(run)
    final = run / "adapters" / "final"
    shutil.rmtree(final)
    staged = run / "adapters" / ".final.tmp-99999"  # what the killed export left
    staged.mkdir()
    (staged / "adapter.safetensors.tmp").write_bytes(b"\0" * 100)
    assert fit_here(config, run, "--ckpt_path", "last") == 0  # nothing left to train: the export is owed
    assert same_weights(final_adapter(run), want)
    assert not leftovers(run)
    shutil.rmtree(final)
    final.mkdir()  # an older writer's half-written final/ (an empty folder) counts as missing too
    (final / "adapter.safetensors").write_bytes(b"\0" * 10)
    assert fit_here(config, run, "--ckpt_path", "last") == 0
    assert same_weights(final_adapter(run), want) and (final / "fact_adapter.bin").is_file()


# --- a file that is not a checkpoint -----------------------------------------------------------------------
def _bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    data = good.read_bytes()
    paths = {name: folder / name for name in ("random.ckpt", "truncated.ckpt", "bitflip.ckpt", "state_dict.ckpt",
                                              "objects.ckpt", "adapter.safetensors", "a_folder.ckpt", "missing.ckpt")}
    paths["random.ckpt"].write_bytes(os.urandom(4096))
    paths["truncated.ckpt"].write_bytes(data[: len(data) * 2 // 3])
    middle = len(data) // 2  # inside a tensor's bytes: torch would load it without a word
    paths["bitflip.ckpt"].write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:])
    state = torch.load(good, weights_only=True)
    torch.save(state["state_dict"], paths["state_dict.ckpt"])  # weights alone, no training state
    with open(paths["objects.ckpt"], "wb") as f:
        torch.save({**state, "extra": pickle.Unpickler}, f)  # a Python object: weights_only refuses it
    shutil.copy(good.parents[1] / "adapters" / "final" / "adapter.safetensors", paths["adapter.safetensors"])
    paths["a_folder.ckpt"].mkdir()
    return paths


def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(config, done_run, tmp_path, capsys):
    paths = _bad_checkpoints(tmp_path / "bad", done_run / "checkpoints" / "last.ckpt")
    run = tmp_path / "run"
    for name, path in paths.items():
        code = fit_here(config, run, "--ckpt_path", str(path))
        _one_error(code, capsys.readouterr().err, str(path))
        assert not (run / "config.yaml").exists(), name  # refused before the run wrote anything


# --- a resume with changed options -------------------------------------------------------------------------
def test_a_changed_learning_rate_is_applied_and_recorded(config, done_run, tmp_path):
    run = _copy(done_run, tmp_path)
    assert fit_here(config, run, "--ckpt_path", "last", "--trainer.max_steps", "4",
                    "--model.optimizer.init_args.lr", "0.0005") == 0
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]] == [0.0005]  # the restore's 0.001 is gone
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["model"]["optimizer"]["init_args"]["lr"] == 0.0005


@pytest.mark.parametrize("args,words", [
    (["--model.projection.dim", "32"], ["model.projection.dim", "32", "64"]),
    (["--model.adapter_dtype", "float32"], ["model.adapter_dtype", "float32", "float64"]),
    (["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.1"],
     ["model.optimizer", "SGD", "Adam"]),
    (["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.init_args.step_size", "2"],
     ["model.lr_scheduler", "StepLR", "none"]),
], ids=["projection", "adapter-dtype", "optimizer-class", "scheduler-added"])
def test_a_change_the_checkpoint_cannot_follow_is_refused_in_one_line(config, done_run, tmp_path, capsys, args, words):
    run = _copy(done_run, tmp_path)
    before = (run / "config.yaml").read_bytes()
    code = fit_here(config, run, "--ckpt_path", "last", "--trainer.max_steps", "4", *args)
    _one_error(code, capsys.readouterr().err, *words)
    assert (run / "config.yaml").read_bytes() == before  # config.yaml still says what the run did
    assert step_of(run / "checkpoints" / "last.ckpt") == 3


@pytest.mark.slow
def test_two_real_fits_into_one_folder_the_second_stops_and_the_first_is_untouched(shards, tmp_path):
    from tests.training.runs import FACT_TRAIN, ROOT

    config = write_config(tmp_path, shards, steps=400)  # runs until the test stops it
    run = tmp_path / "run"
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(run)]
    first = subprocess.Popen([FACT_TRAIN, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.ckpt").exists():  # the first fit is training
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        second = subprocess.run([FACT_TRAIN, *args, "--trainer.max_steps", "2"], cwd=ROOT, capture_output=True,
                                text=True, timeout=240)
        _one_error(second.returncode, second.stderr, "another fact-train", f"pid {first.pid}", str(run))
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=240) == 128 + signal.SIGTERM, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert step_of(run / "checkpoints" / "last.ckpt") > 2  # the first fit's own, saved as it stopped
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 400  # the second wrote nothing

"""Faults of `fact-data`, reproduced for real: FIFOs and devices in input lists, symlinks, a killed worker,
two builds into one folder, a re-build with other options, damaged shards, and user errors that must end
as one line and exit 2 with nothing half-written left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.build import run_build
from data_tools.dataset import inspect_dataset
from data_tools.records import RecordOptions, read_regular_file
from data_tools.sources import LINK_LOOP, NOT_A_FILE, discover
from dt_helpers import RAW, build_opts, one_error_line, rewrite_shard
from worker_deaths import kill_a_worker_of_a_build
from fact_lightning.data import shards
from fact_lightning.errors import UserError
from tests.conftest import NEEDS_MOUNT_NS, unshare_mount_works

FACT_DATA = str(Path(sys.executable).parent / "fact-data")
ENV = {**os.environ, "GLOG_minloglevel": "2", "COLUMNS": "200"}
TINY = ["--encoder", "tiny", "--random-encoder"]


def fact_data(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FACT_DATA, *args], capture_output=True, text=True, timeout=timeout, env=env or ENV)


def small_src(root: Path) -> Path:
    src = root / "src"
    shutil.copytree(RAW / "fr_biden", src / "fr_biden")
    return src


# --- inputs ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_list_rows_naming_a_fifo_or_a_device_are_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    rows = [{"path": str(fifo), "identity": "a"}, {"path": "/dev/zero", "identity": "a"},
            {"path": str(RAW / "fr_biden" / "1.jpg"), "identity": "a"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = discover(listing)
    assert [i.source for i in found.items] == [rows[2]["path"]]
    assert {(s.source, s.reason) for s in found.skipped} == {(str(fifo), NOT_A_FILE), ("/dev/zero", NOT_A_FILE)}
    assert "FIFO" in {s.source: s.detail for s in found.skipped}[str(fifo)]
    # And at read time (a file swapped for a FIFO after discovery): no blocking, a reason.
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular_file(str(fifo), 1 << 20)
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular_file("/dev/zero", 1 << 20)
    with pytest.raises(ValueError, match="limit of 10"):
        read_regular_file(rows[2]["path"], 10)
    assert RecordOptions().max_file_mb == 256


def test_symlinked_identities_are_followed_and_everything_unused_is_reported(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    shutil.copytree(RAW / "fr_obama", elsewhere / "obama")
    shutil.copytree(RAW / "fr_biden", src / "biden")
    (src / "obama").symlink_to(elsewhere / "obama", target_is_directory=True)  # a linked identity
    (src / "biden" / "loop").symlink_to(src / "biden", target_is_directory=True)  # a loop
    (src / "biden" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # a broken link
    os.mkfifo(src / "biden" / "fifo.png")  # not a file
    found = discover(src)
    assert sorted(i.source for i in found.items) == ["biden/1.jpg", "biden/2.jpg", "obama/1.jpg", "obama/2.jpg"]
    reasons = {s.source: s.reason for s in found.skipped}
    assert reasons == {"biden/gone.jpg": NOT_A_FILE, "biden/fifo.png": NOT_A_FILE, "biden/loop": LINK_LOOP}
    assert found.found == 7


def test_identity_folders_missing_exit_nonzero_with_the_reason(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    shutil.copy(RAW / "fr_biden" / "1.jpg", src / "a.jpg")
    line = one_error_line(fact_data("build", "--src", str(src), "--out", str(tmp_path / "out"), *TINY))
    assert "no usable photos" in line and "no_identity_folder" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["not_object", "identity_list", "not_utf8"])
def test_bad_input_lists_end_in_one_line_naming_the_file(tmp_path, kind):
    photo = str(RAW / "fr_biden" / "1.jpg")
    if kind == "not_object":
        listing = tmp_path / "list.jsonl"
        listing.write_text(json.dumps({"path": photo, "identity": "a"}) + "\n" + json.dumps([photo, "a"]) + "\n")
        expected = ":2: each line must be a JSON object"
    elif kind == "identity_list":
        listing = tmp_path / "list.jsonl"
        listing.write_text(json.dumps({"path": photo, "identity": ["x"]}) + "\n")
        expected = "'identity' must be a string, got list ['x']"
    else:
        listing = tmp_path / "list.csv"
        listing.write_bytes(b"path,identity\n" + photo.encode() + b",caf\xe9\n")
        expected = "not UTF-8 text"
    line = one_error_line(fact_data("build", "--src", str(listing), "--out", str(tmp_path / "out"), *TINY))
    assert str(listing) in line and expected in line
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    line = one_error_line(fact_data("build", "--src", str(small_src(tmp_path)), "--out", str(out), *TINY))
    assert f"--out {out} exists and is not a folder" in line
    assert out.read_text() == "not a folder"


@pytest.mark.slow
@pytest.mark.parametrize("mount_opts,reason", [("size=96k", "No space left on device"), ("ro", "Read-only file system")])
def test_full_or_read_only_disk_ends_in_one_line_and_leaves_no_tmp(tmp_path, mount_opts, reason):
    """A tiny (or read-only) tmpfs in a private mount namespace: it vanishes with the command."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert unshare_mount_works(mnt), NEEDS_MOUNT_NS  # a real full disk, never skipped
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; "$3" build --src "$4" --out "$2/out" '
              '--encoder tiny --random-encoder; rc=$?; echo "LISTING:"; ls -a "$2/out" 2>/dev/null; exit $rc')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", mount_opts, str(mnt), FACT_DATA,
                             str(small_src(tmp_path))], capture_output=True, text=True, timeout=120, env=ENV)
    line = one_error_line(result)
    assert reason in line and str(mnt / "out") in line
    listing = result.stdout.split("LISTING:")[1].split()
    assert not [name for name in listing if name.endswith(".tmp")], listing
    assert shards.MANIFEST_NAME not in listing


def test_a_full_disk_while_writing_a_shard_removes_its_tmp(tmp_path, monkeypatch):
    import webdataset as wds

    def full(self, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wds.TarWriter, "write", full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"cannot write .*shard-000000\.tar: No space left on device"):
        run_build(build_opts(small_src(tmp_path), out))
    assert not list(out.glob("*.tmp")) and not (out / shards.MANIFEST_NAME).exists()


# --- concurrency and dying workers ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_worker_fails_the_build_cleanly_and_the_next_run_resumes(raw_copy, tmp_path):
    """The first worker is killed the moment it appears (inside its spawn): the build ends within seconds."""
    out = tmp_path / "out"
    cmd = [FACT_DATA, "build", "--src", str(raw_copy), "--out", str(out), *TINY, "--workers", "2",
           "--images-per-shard", "2"]
    trial = kill_a_worker_of_a_build(cmd, delay_s=0.0, env=ENV, hang_s=30)
    assert trial.killed and trial.returncode is not None, "the build did not end within 30 s of the kill"
    assert trial.end_after_kill_s < 15, trial.end_after_kill_s
    result = subprocess.CompletedProcess(cmd, trial.returncode, "", trial.stderr)
    assert "a worker process died" in one_error_line(result)
    assert not list(out.glob("*.tmp"))
    again = fact_data("build", "--src", str(raw_copy), "--out", str(out), *TINY, "--images-per-shard", "2",
                      timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert inspect_dataset(out).ok


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_second_build_into_the_same_folder_is_refused(raw_copy, tmp_path):
    out = tmp_path / "out"
    cmd = [FACT_DATA, "build", "--src", str(raw_copy), "--out", str(out), *TINY]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        lock = out / shards.LOCK_NAME
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # hold it there, lock taken, however fast this machine is
        second = fact_data(*cmd[1:])
        line = one_error_line(second)
        assert f"another fact-data build (pid {first.pid}) is writing to {out}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# --- re-builds and damaged shards ----------------------------------------------------------------------------
def test_changed_options_keep_the_old_manifest_until_the_new_one_is_complete(tmp_path, monkeypatch, caplog):
    from data_tools.shard_builder import ShardBuilder

    src, out = small_src(tmp_path), tmp_path / "out"
    src_obama = src / "fr_obama"
    shutil.copytree(RAW / "fr_obama", src_obama)
    first = run_build(build_opts(src, out, images_per_shard=2))
    old_manifest = (out / shards.MANIFEST_NAME).read_bytes()
    real = ShardBuilder.process_shard

    def killed_after_one(self, plan):
        if plan.index == 1:
            raise KeyboardInterrupt  # the re-build is interrupted half-way
        return real(self, plan)

    monkeypatch.setattr(ShardBuilder, "process_shard", killed_after_one)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        run_build(build_opts(src, out, images_per_shard=2, record=RecordOptions(jpeg_quality=80)))
    assert any("options changed" in r.getMessage() and "record" in r.getMessage() for r in caplog.records)
    assert (out / shards.MANIFEST_NAME).read_bytes() == old_manifest  # kept
    with pytest.raises(shards.ManifestError, match="re-build stopped half-way"):
        shards.shard_urls(out, first)  # and a reader is told, not handed a mix
    monkeypatch.undo()
    done = run_build(build_opts(src, out, images_per_shard=2, record=RecordOptions(jpeg_quality=80)))
    assert done["resumed_shards"] == 1 and shards.shard_urls(out, done)


def test_resume_rebuilds_a_bit_flipped_shard(tmp_path):
    src, out = small_src(tmp_path), tmp_path / "out"
    shutil.copytree(RAW / "fr_obama", src / "fr_obama")
    opts = build_opts(src, out, images_per_shard=2)
    run_build(opts)
    shard = out / shards.shard_name(0)
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    again = run_build(opts)
    assert again["resumed_shards"] == 1  # shard 1 kept; shard 0 (same size, other hash) rebuilt
    assert shard.read_bytes() == good


def _garbage_crop(sample):
    sample["00.crop.jpg"] = b"\xff\xd8\xff" + b"garbage" * 50


def _narrow_tokens(sample):
    buf = io.BytesIO()
    np.save(buf, np.zeros((144, 32), np.float16))
    sample["00.tokens.npy"] = buf.getvalue()


@pytest.mark.parametrize("damage", ["garbage_image", "flipped_byte", "token_shape"])
def test_inspect_finds_damaged_shards(built, tmp_path, damage):
    out, manifest = built
    root = tmp_path / "copy"
    shutil.copytree(out, root)
    name = manifest["shards"][0]["name"]
    if damage == "garbage_image":
        rewrite_shard(root, 0, _garbage_crop)
    elif damage == "token_shape":
        rewrite_shard(root, 0, _narrow_tokens)
    else:
        data = bytearray((root / name).read_bytes())
        data[len(data) // 3] ^= 0x10
        (root / name).write_bytes(bytes(data))
    result = fact_data("inspect", str(root))
    assert result.returncode == 1, result.stdout
    row = next(line for line in result.stdout.splitlines() if name in line)
    assert "BAD" in row
    expected = {"garbage_image": "crop.jpg", "flipped_byte": "sha256", "token_shape": "tokens"}[damage]
    assert expected in result.stdout.replace("\n", " ")
    quick = fact_data("inspect", "--quick", str(root))
    assert quick.returncode == (0 if damage == "garbage_image" else 1)  # --quick does not decode images


@pytest.mark.parametrize("command", ["preview", "verify-identities"])
def test_preview_and_verify_on_a_garbage_image_end_in_one_line(built, tmp_path, command):
    if command == "verify-identities":
        pytest.importorskip("dlib")
    out, manifest = built
    root = tmp_path / "copy"
    shutil.copytree(out, root)
    rewrite_shard(root, 0, _garbage_crop)
    written = tmp_path / ("sheet.png" if command == "preview" else "report.jsonl")
    flag = "--out" if command == "preview" else "--report"
    line = one_error_line(fact_data(command, str(root), flag, str(written)))
    assert manifest["shards"][0]["name"] in line and "crop.jpg does not decode" in line
    assert not written.exists() and not list(tmp_path.glob("*.tmp"))


# --- help ------------------------------------------------------------------------------------------------------
def test_build_help_is_readable_at_80_columns():
    import dataclasses

    from data_tools.options import BuildOptions

    result = fact_data("build", "--help", env={**ENV, "COLUMNS": "80"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "…" not in result.stdout
    from data_tools.options import LatentOptions

    names = [f.name for f in dataclasses.fields(BuildOptions) if f.name not in ("record", "latents")]
    names += [f.name for f in dataclasses.fields(RecordOptions)] + [f.name for f in dataclasses.fields(LatentOptions)]
    for name in names:
        assert f"--{name.replace('_', '-')} " in result.stdout or f"--{name.replace('_', '-')}\n" in result.stdout, name
    assert "[default: 512]" in result.stdout  # defaults come from the dataclasses

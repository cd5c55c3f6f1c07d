"""Outputs are never overwritten: fact-generate and fact-evaluate assemble their folder aside and swap it in
whole. Attacked here with exceptions, Ctrl-C, SIGTERM, SIGKILL leftovers, a second run into the same place,
a filesystem without an atomic exchange, and a symlinked --out."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fact_lightning.errors import UserError
from fact_lightning.inference import outputs
from fact_lightning.inference.outputs import OutputFolder
from tests.inference.cli_runner import BIN, assert_one_error, run_cli
from tests.inference.conftest import FACES

pytestmark = pytest.mark.timeout(60)
OBAMA = sorted((FACES / "fr_obama").iterdir())
FAST = ["--tiny", "--prompt", "a photo of {subject}", "--steps", "2", "--height", "64", "--width", "64",
        "--reference", str(OBAMA[0])]
MANY = [arg for seed in range(60) for arg in ("--seed", str(seed))]  # keeps a run generating for a while


def _earlier(out: Path) -> dict[str, bytes]:
    """An earlier run's results, returned as {relative path: bytes} to compare with later."""
    (out / "images").mkdir(parents=True)
    (out / "images" / "p000_s0_0.png").write_bytes(b"earlier image")
    (out / "settings.json").write_text('{"earlier": true}\n')
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


# --- the mechanism, in process -----------------------------------------------------------------------------
def test_a_new_folder_appears_only_complete(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with OutputFolder(out) as output:
        output.path("images/x.png").write_bytes(b"x")
        assert not any(out.iterdir())  # the place is held (empty) while the run assembles aside
        assert [p.name for p in _staging(out)] == [f".out.partial-{os.getpid()}"]
        output.write_json("settings.json", {"n": 1})
    assert sorted(_snapshot(out)) == ["images/x.png", "settings.json"] and not _staging(out)


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_a_stopped_run_leaves_nothing_of_its_own(tmp_path, stop):
    out = tmp_path / "a" / "out"
    with pytest.raises(stop):
        with OutputFolder(out) as output:
            output.path("images/x.png").write_bytes(b"x")
            raise stop()
    assert list(tmp_path.iterdir()) == []  # not the folder, not its new parent, not the staging folder


def test_earlier_results_are_refused_then_replaced_whole_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    before = _earlier(out)
    with pytest.raises(UserError, match=f"output folder {out} holds earlier results.*--overwrite"):
        OutputFolder(out)
    with pytest.raises(RuntimeError):
        with OutputFolder(out, overwrite=True) as output:
            output.path("images/p000_s0_0.png").write_bytes(b"new")
            assert _snapshot(out) == before  # untouched while the new one is assembled
            raise RuntimeError("failed half-way")
    assert _snapshot(out) == before and not _staging(out)
    with OutputFolder(out, overwrite=True) as output:
        output.path("images/p001_s0_0.png").write_bytes(b"new")
    assert _snapshot(out) == {"images/p001_s0_0.png": b"new"} and not _staging(out)


def test_the_swap_without_an_atomic_exchange_still_replaces_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # e.g. an overlay filesystem
    out = tmp_path / "out"
    _earlier(out)
    with OutputFolder(out, overwrite=True) as output:
        output.write_json("settings.json", {"new": True})
    assert sorted(_snapshot(out)) == ["settings.json"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_used_and_a_link_to_a_folder_stays_a_link(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with OutputFolder(empty) as output:
        output.write_json("settings.json", {})
    assert (empty / "settings.json").is_file()
    target, link = tmp_path / "target", tmp_path / "link"
    _earlier(target)
    link.symlink_to(target, target_is_directory=True)
    with OutputFolder(link, overwrite=True) as output:
        output.write_json("settings.json", {"new": True})
    assert link.is_symlink() and sorted(_snapshot(target)) == ["settings.json"]


def test_a_second_run_into_the_same_place_refuses(tmp_path):
    out = tmp_path / "out"
    early = OutputFolder(out)  # checked before the first one started: refuses when it begins writing
    with OutputFolder(out) as first:
        first.write_json("settings.json", {"run": 1})
        for overwrite in (False, True):
            with pytest.raises(UserError, match=f"another run is writing to {out}"):
                OutputFolder(out, overwrite=overwrite)
        with pytest.raises(UserError, match=f"another run is writing to {out}"):
            with early:
                pass
    assert _snapshot(out) == {"settings.json": b'{\n  "run": 1\n}\n'} and not _staging(out)
    with pytest.raises(UserError, match="holds earlier results"):  # the late one, after the first finished
        with early:
            pass


def test_a_killed_runs_staging_folder_is_swept_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-99999999"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "half.png").write_bytes(b"half")
    with OutputFolder(out) as output:
        output.write_json("settings.json", {})
    assert not stale.exists() and sorted(_snapshot(out)) == ["settings.json"]


# --- the commands, with real signals ---------------------------------------------------------------------
def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fact-generate"), *FAST, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_generating(proc: subprocess.Popen, out: Path, deadline_s: float = 240) -> None:
    """Until the run has written an image into its staging folder (it is generating, not loading)."""
    deadline = time.monotonic() + deadline_s
    while not any(p for s in _staging(out) for p in s.glob("images/*.png")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never started generating"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_mid_run_keeps_the_earlier_folder_and_a_second_run_refuses(tmp_path):
    out = tmp_path / "out"
    before = _earlier(out)
    proc = _start(*MANY, "--out", out, "--overwrite")
    try:
        _wait_generating(proc, out)
        assert _snapshot(out) == before
        for overwrite in ([], ["--overwrite"]):  # a second run into the same place, while the first writes
            second = run_cli("fact-generate", *FAST, "--out", out, *overwrite, timeout=150)
            assert_one_error(second, f"another run is writing to {out}")
        status, err = _stop(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert status == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert _snapshot(out) == before and not _staging(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ctrl_c_mid_run_leaves_no_new_folder(tmp_path):
    out = tmp_path / "new" / "out"
    proc = _start(*MANY, "--out", out)
    try:
        _wait_generating(proc, out)
        status, err = _stop(proc, signal.SIGINT)
    finally:
        proc.kill()
    assert status == 130 and "Traceback" not in err, err[-3000:]
    assert list(tmp_path.iterdir()) == []  # no folder, no parent it made, no staging folder


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_rerun_refuses_without_overwrite_and_replaces_atomically_with_it(tmp_path):
    out = tmp_path / "out"
    before = _earlier(out)
    refused = run_cli("fact-generate", *FAST, "--out", out, timeout=150)
    assert_one_error(refused, str(out), "holds earlier results", "--overwrite")
    ids = tmp_path / "ids"
    (ids / "obama").mkdir(parents=True)
    (ids / "obama" / "1.jpg").write_bytes(OBAMA[0].read_bytes())
    refused = run_cli("fact-evaluate", "--tiny", "--identities", ids, "--prompt", "a", "--out", out, timeout=150)
    assert_one_error(refused, str(out), "holds earlier results", "--overwrite")
    assert _snapshot(out) == before
    replaced = run_cli("fact-generate", *FAST, "--seed", "7", "--out", out, "--overwrite", timeout=300)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    after = _snapshot(out)
    assert "settings.json" in after and "images/p000_s7_0.png" in after and "images/p000_s0_0.png" not in after
    assert b"earlier" not in after["settings.json"] and not _staging(out)

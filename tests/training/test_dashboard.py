"""The dashboards a user opens: `fact-train` writes a run folder, the venv's real TensorBoard serves it over HTTP,
and every plotted value sits at the step it belongs to."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fact_lightning.training.conditioning import ShuffleSchedule

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
FAIR_WEIGHT = 0.5  # large, so that a stale diffusion or FAIR value cannot pass the identity check by luck
STEPS, EVERY = 9, 3
SCHEDULE = ShuffleSchedule(start=0.2, end=0.6, ramp_steps=8)


@pytest.fixture(scope="module")
def run_folder(shards, tmp_path_factory) -> Path:
    """A short tiny run through the real console script, with log_every_n_steps > 1."""
    run = tmp_path_factory.mktemp("dash") / "run"
    args = [str(BIN / "fact-train"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--data.root", str(shards), "--data.streaming", "false", "--data.resolution", "64",
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(STEPS),
            "--trainer.log_every_n_steps", str(EVERY), "--model.fair_weight", str(FAIR_WEIGHT),
            "--model.shuffle.ramp_steps", str(SCHEDULE.ramp_steps)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **query):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(run_folder):
    """The venv's `tensorboard` on a free loopback port; yields a GET function for its HTTP data API."""
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "tensorboard"), "--logdir", str(run_folder), "--host", "127.0.0.1",
                             "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        tags = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"tensorboard exited: {proc.stdout.read()[-2000:]}"
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
                if any("curriculum/p_shuffle" in t for t in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags, "tensorboard served no scalars within 90 s"
        yield lambda path, **query: _get(port, path, **query)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _run_tags(get) -> tuple[str, dict]:
    tags = get("/data/plugin/scalars/tags")
    (run, run_tags), = [(r, t) for r, t in tags.items() if "train/loss" in t]
    return run, run_tags


@pytest.mark.slow
def test_one_run_one_folder(run_folder):
    assert list(run_folder.glob("events.out.tfevents.*"))  # events at the run folder's top: no version_N
    assert (run_folder / "config.yaml").is_file()
    assert (run_folder / "checkpoints" / "last.ckpt").is_file()
    assert (run_folder / "adapters" / "final" / "adapter.safetensors").is_file()
    assert not list(run_folder.glob("version_*")) and not list(run_folder.glob("**/lightning_logs"))


def test_tensorboard_serves_every_dashboard(tensorboard):
    run, tags = _run_tags(tensorboard)
    fair = [t for t in tags if t.startswith("fair/")]
    attn = [t for t in tags if t.startswith("gate_attn/")]
    ff = [t for t in tags if t.startswith("gate_ff/")]
    assert len(fair) == len(attn) == len(ff) == 16, (len(fair), len(attn), len(ff))
    assert {"train/loss", "train/diffusion", "train/fair_total", "curriculum/p_shuffle"} <= set(tags)
    layout = tensorboard("/data/plugin/custom_scalars/layout")
    titles = {c["title"] for c in layout["category"]}
    assert {"FAIR by depth", "gate tanh(g_attn) by depth", "gate tanh(g_ff) by depth"} <= titles
    images = tensorboard("/data/plugin/images/tags")
    assert any(images.get(run, {})), images  # the training previews


def _series(get, run: str, tag: str) -> dict[int, float]:
    return {step: value for _, step, value in get("/data/plugin/scalars/scalars", run=run, tag=tag)}


def test_values_sit_at_their_steps(tensorboard):
    run, _ = _run_tags(tensorboard)
    loss = _series(tensorboard, run, "train/loss")
    diffusion = _series(tensorboard, run, "train/diffusion")
    fair = _series(tensorboard, run, "train/fair_total")
    p_shuffle = _series(tensorboard, run, "curriculum/p_shuffle")
    logged = sorted(diffusion)
    assert logged == [EVERY - 1 + k * EVERY for k in range(STEPS // EVERY)], logged
    for step in logged:
        # the loss of a step is its own diffusion + lambda * FAIR: all three come from the same step
        assert loss[step] == pytest.approx(diffusion[step] + FAIR_WEIGHT * fair[step], rel=1e-5), step
        assert p_shuffle[step] == pytest.approx(SCHEDULE.value(step), abs=1e-6), step

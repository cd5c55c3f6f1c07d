"""Progress where people look: long commands whose output goes to a file or a pipe (a cluster job's log) write
plain ``progress:`` lines on stderr while they work, and keep rich's bar on a terminal.

Each console script runs once, as users run it, with stderr a pipe read line by line: a progress line must
arrive before the command's result exists (its output is put in place whole at the end), with counts that
grow towards a known total. ``FACT_PROGRESS_INTERVAL=0`` asks for a line at every unit.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.progress import Progress

from fact_lightning.callbacks.progress import StepProgressBar
from fact_lightning.commands.console import (PROGRESS_INTERVAL_ENV, PlainProgress, ProgressLines, progress,
                                             progress_interval)

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
RAW = ROOT / "tests" / "fixtures" / "faces" / "raw"
OBAMA = sorted((RAW / "fr_obama").iterdir())
TINY_IMAGES = ["--steps", "2", "--height", "64", "--width", "64"]
LINE = re.compile(r"^progress: (?P<what>[a-z ()0-9]+?) (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)(?P<rest>.*)$")


# -- the lines themselves --------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_first_at_once_then_every_interval_then_at_the_end():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines("step", 100, unit="step", interval=30, stream=out, clock=clock)
    assert not lines.update(0)  # nothing done yet: no line
    clock.now += 2
    assert lines.update(1, loss=0.5)  # the first unit: a line at once
    for step in range(2, 80):  # 0.5 s per step: the next line 30 s after the first
        clock.now += 0.5
        lines.update(step)
    clock.now += 0.5
    lines.finish(80)
    got = out.getvalue().splitlines()
    assert got == [
        "progress: step 1/100 (1%), 2 s/step, elapsed 0:00:02, ETA 0:03:18, loss 0.5",
        "progress: step 61/100 (61%), 1.91 steps/s, elapsed 0:00:32, ETA 0:00:20",
        "progress: step 80/100 (80%), 1.93 steps/s, elapsed 0:00:42, ETA 0:00:10",
    ]
    lines.finish(80)  # no second line for the same count
    assert len(out.getvalue().splitlines()) == 3


def test_a_resumed_count_leaves_its_start_out_of_the_rate_and_an_unknown_total_has_no_eta():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines("step", 200, unit="step", start=100, interval=0, stream=out, clock=clock)
    assert not lines.update(100)
    clock.now += 10
    lines.update(120)
    open_ended = ProgressLines("photos", None, unit="photo", interval=0, stream=out, clock=clock)
    clock.now += 4
    open_ended.update(8)
    assert out.getvalue().splitlines() == [
        "progress: step 120/200 (60%), 2 steps/s, elapsed 0:00:10, ETA 0:00:40",
        "progress: photos 8, 2 photos/s, elapsed 0:00:04",
    ]


def test_plain_progress_takes_the_calls_the_commands_make(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with PlainProgress(interval=3600) as bar:
        task = bar.add_task("photos", total=None, unit="photo")
        bar.update(task, total=5, description="photos (2 shards)")
        for _ in range(5):
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert [LINE.match(line)["done"] for line in lines] == ["1", "5"]  # the first, and the last at the end
    assert all(LINE.match(line)["what"] == "photos (2 shards)" and LINE.match(line)["total"] == "5" for line in lines)
    out.truncate(0)
    out.seek(0)
    with pytest.raises(RuntimeError), PlainProgress(interval=3600) as bar:
        task = bar.add_task("images", total=3)
        bar.advance(task)
        raise RuntimeError  # an error: no last line after it (the error line stays the last)
    assert len(out.getvalue().splitlines()) == 1


def test_rich_on_a_terminal_plain_lines_elsewhere(monkeypatch):
    assert isinstance(progress(console=Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(progress(console=Console(file=io.StringIO())), PlainProgress)
    assert isinstance(progress(console=Console(file=io.StringIO(), force_terminal=True, force_interactive=False)),
                      PlainProgress)
    trainer = SimpleNamespace(is_global_zero=True)
    for kwargs, plain in (({"force_terminal": True}, False), ({"file": io.StringIO()}, True)):
        bar = StepProgressBar(console_kwargs=kwargs)
        bar.setup(trainer, None, "fit")
        assert bar.plain is plain and bar.is_enabled is not plain
    other_rank = StepProgressBar(console_kwargs={"file": io.StringIO()})
    other_rank.setup(SimpleNamespace(is_global_zero=False), None, "fit")
    assert not other_rank.plain and other_rank.is_disabled  # only rank 0 reports


def test_the_interval_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv(PROGRESS_INTERVAL_ENV, raising=False)
    assert progress_interval() == 30
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "2.5")
    assert progress_interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(PROGRESS_INTERVAL_ENV, bad)
        assert progress_interval() == 30
    assert PROGRESS_INTERVAL_ENV in caplog.text
    with pytest.raises(ValueError):
        StepProgressBar(interval=-1)


# -- the console scripts, output to a pipe ---------------------------------------------------------------------
def watch(args: list, ended, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[tuple[str, bool]]]:
    """Runs a console script with stdout and stderr pipes (no terminal); returns the finished
    process and every progress line with ``ended()`` as it was when the line arrived."""
    env = {**os.environ, PROGRESS_INTERVAL_ENV: "0", "COLUMNS": "100"}
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    with subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:  # stdout is small (a summary): read once stderr has closed
        stderr, seen = [], []
        for line in proc.stderr:  # as the command writes it
            stderr.append(line)
            if line.startswith("progress:"):
                seen.append((line.rstrip("\n"), ended()))
        stdout = proc.stdout.read()
        code = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(args, code, stdout, "".join(stderr)), seen


def parsed(seen: list[tuple[str, bool]], what: str) -> list[re.Match]:
    matches = [LINE.match(line) for line, _ in seen]
    assert all(matches), seen
    assert all(m["what"].startswith(what) for m in matches), seen
    return matches


def assert_progress(result, seen, what: str, total: int) -> list[re.Match]:
    """Lines before the end, counts that grow to a known total, each with a rate and the elapsed time."""
    assert result.returncode == 0, result.stderr[-3000:]
    lines = parsed(seen, what)
    assert len(lines) >= 2, seen
    assert not seen[0][1], f"the first progress line came after the result was written: {seen}"
    done = [int(m["done"]) for m in lines]
    assert done == sorted(set(done)) and done[0] >= 1 and done[-1] == total, done
    assert {int(m["total"]) for m in lines} == {total}
    assert all(re.search(r", [\d.]+ (\w+ ?\w*/s|s/[\w ]+), elapsed \d+:\d\d:\d\d", m["rest"]) for m in lines), seen
    assert all("ETA" in m["rest"] for m in lines[:-1])
    assert not any(line.startswith("progress:") for line in result.stdout.splitlines())
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fact_data_build_and_add_latents_report_progress(tmp_path):
    out = tmp_path / "shards"
    result, seen = watch([BIN / "fact-data", "build", "--src", RAW, "--out", out, "--encoder", "tiny",
                          "--random-encoder", "--resolution", "64", "--images-per-shard", "4"],
                         ended=lambda: (out / "manifest.json").exists())  # written last
    photos = json.loads((out / "manifest.json").read_text())["counts"]["found"]
    assert_progress(result, seen, "photos", photos)

    images = sum(entry["images"] for entry in json.loads((out / "manifest.json").read_text())["shards"])
    result, seen = watch([BIN / "fact-data", "add-latents", out, "--vae", "tiny"],
                         ended=lambda: bool(json.loads((out / "manifest.json").read_text()).get("vae")))
    assert_progress(result, seen, "images", images)


FIT_STEPS = 6


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """One tiny `fact-train fit` of FIT_STEPS steps on synthetic shards, watched through its pipes."""
    from fact_lightning.experiments.synthetic import write_synthetic_shards

    tmp = tmp_path_factory.mktemp("fit")
    write_synthetic_shards(tmp / "shards", identities=2, images_per_identity=2, groups_per_shard=2, resolution=64)
    run = tmp / "run"
    result, seen = watch([BIN / "fact-train", "fit", "--config", ROOT / "configs" / "tiny.yaml",
                          "--data.root", tmp / "shards", "--data.streaming", "false", "--data.resolution", "64",
                          "--trainer.default_root_dir", run, "--trainer.max_steps", FIT_STEPS,
                          "--trainer.log_every_n_steps", "2"],
                         ended=lambda: (run / "adapters" / "final").exists())
    return result, seen, run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fact_train_fit_reports_steps_rate_eta_and_loss(fit_run):
    result, seen, _ = fit_run
    lines = assert_progress(result, seen, "step", FIT_STEPS)
    assert [int(m["done"]) for m in lines] == list(range(1, FIT_STEPS + 1))  # interval 0: a line at every step
    losses = [re.search(r"train/loss ([\d.e+-]+)", m["rest"]) for m in lines]
    assert all(losses) and all(0 < float(x[1]) < 100 for x in losses), seen
    assert "train steps" not in result.stdout + result.stderr  # no rich bar drawn at the end instead


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fit_logs_gates_and_fair_under_short_names_that_the_layout_charts(fit_run):
    """The dashboards of the same run: 16 short site names per family, each in one Custom Scalars chart."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    from tests.training.test_card_names import PREFIXES, SD15_NAMES

    result, _, run = fit_run
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for prefix in PREFIXES.values():
        assert {t for t in tags if t.startswith(prefix + "/")} == {f"{prefix}/{name}" for name in SD15_NAMES}
    assert not [t for t in tags if "transformer_blocks" in t]
    config = events.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    categories = {c.title: c for c in layout.category}
    for category, prefix in PREFIXES.items():
        for name in SD15_NAMES:
            charts = [chart.title for chart in categories[category].chart
                      if any(re.match(r, f"{prefix}/{name}") for r in chart.multiline.tag)]
            assert len(charts) == 1, (prefix, name, charts)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fact_generate_reports_images(tmp_path):
    out = tmp_path / "generate"
    result, seen = watch([BIN / "fact-generate", "--tiny", "--reference", OBAMA[0], "--prompt", "a photo of {subject}",
                          "--seed", "0", "--seed", "1", "--seed", "2", *TINY_IMAGES, "--out", out],
                         ended=(out / "settings.json").exists)  # in place when the folder is complete
    assert_progress(result, seen, "images", 3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fact_evaluate_reports_pairs_on_stderr_and_keeps_stdout_json(tmp_path):
    out = tmp_path / "eval"
    result, seen = watch([BIN / "fact-evaluate", "--tiny", "--identities", RAW, "--max-identities", "2",
                          "--prompt", "a photo of {subject}", "--seed", "0", "--seed", "1", *TINY_IMAGES,
                          "--out", out], ended=(out / "metrics.json").exists)
    assert_progress(result, seen, "image pairs", 4)
    assert set(json.loads(result.stdout)) >= {"clip_t", "face_sim", "face_detect_rate"}  # stdout: the JSON only

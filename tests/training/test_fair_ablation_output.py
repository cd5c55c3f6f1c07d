"""`python -m fact_lightning.experiments.fair_ablation` shows what fact-train shows: no library noise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What fact-train drops (commands.console.quiet_library_noise): Lightning's advertising and warnings about
# states that are intended (frozen parts in eval mode, no validation data, a torch deprecation inside Lightning).
NOISE = ("litlogger", "LeafSpec", "module(s) in eval mode", "Total length of", "Traceback")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_ablation_prints_its_results_and_no_library_noise(tmp_path):
    out = tmp_path / "fair.json"
    done = subprocess.run([sys.executable, "-m", "fact_lightning.experiments.fair_ablation", "--out", str(out),
                           "--steps", "1"], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert not [n for n in NOISE if n in shown], shown
    assert "outside/inside increment" in shown  # its own results are still shown
    assert set(json.loads(out.read_text())["runs"]) == {"lambda=0.0", "lambda=0.1"}

"""The Typer CLI: inspect (incl. truncated shards), preview, build errors."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from data_tools.cli import app
from dt_helpers import RAW

runner = CliRunner()


def test_inspect_reports_counts_and_ok(built):
    out, manifest = built
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "format version 1" in result.output and "RANDOM" in result.output
    assert f"{manifest['counts']['images']} images" in result.output


def test_inspect_names_a_truncated_shard(built, tmp_path):
    out, manifest = built
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    name = manifest["shards"][1]["name"]
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 3])
    result = runner.invoke(app, ["inspect", str(broken)])
    assert result.exit_code == 1
    assert name in result.output and "BAD" in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_inspect_flags_a_missing_shard_and_a_garbage_shard(built, tmp_path):
    out, manifest = built
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / manifest["shards"][0]["name"]).unlink()
    (broken / manifest["shards"][1]["name"]).write_bytes(b"not a tar at all" * 100)
    result = runner.invoke(app, ["inspect", str(broken)])
    assert result.exit_code == 1
    assert "missing" in result.output and manifest["shards"][1]["name"] in result.output


def test_preview_writes_contact_sheet(built, tmp_path):
    out, _ = built
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["preview", str(out), "--out", str(sheet), "--columns", "5"])
    assert result.exit_code == 0, result.output
    im = np.asarray(Image.open(sheet))
    assert im.shape == (2 * 192, 5 * 2 * 192, 3)  # 10 images, 5 per row, crop + face per tile
    assert (im[..., 0] > im[..., 1] + 60).mean() > 0.01  # the red mask overlay is visible


def test_build_cli_without_weights_fails_clearly(tmp_path):
    result = runner.invoke(app, ["build", "--src", str(RAW), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--encoder-weights" in result.output and "--random-encoder" in result.output


def test_build_cli_rejects_bad_options(tmp_path):
    result = runner.invoke(app, ["build", "--src", str(RAW), "--out", str(tmp_path / "o"), "--resolution", "100",
                                 "--random-encoder", "--encoder", "tiny"])
    assert result.exit_code == 2 and "resolution" in result.output

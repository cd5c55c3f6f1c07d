"""Identity verification with the offline dlib face-recognition model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from fact_lightning.faces import identity as ident
from data_tools import records
from data_tools.build import run_build
from data_tools.cli import app
from data_tools.dataset import iter_images, verify_dataset
from dt_helpers import RAW, build_opts
from fact_lightning.data import schema

pytest.importorskip("dlib")


def test_check_identity_flags_the_outlier():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=128)
    embs = [centre + rng.normal(scale=0.01, size=128) for _ in range(4)] + [rng.normal(size=128)]
    checks = ident.check_identity(embs, threshold=0.6)
    assert [c.ok for c in checks] == [True] * 4 + [False]
    assert ident.check_identity([centre], 0.6)[0].ok
    assert ident.check_identity([], 0.6) == []


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The fixture identities with one of Obama's photos planted in Biden's folder."""
    src = tmp_path_factory.mktemp("mixed") / "raw"
    shutil.copytree(RAW, src)
    shutil.copy(RAW / "fr_obama" / "1.jpg", src / "df_1" / "intruder.jpg")
    return src


def test_dlib_embeddings_separate_identities(built):
    out, _ = built
    emb = ident.DlibEmbedder()
    vecs = {}
    for group, image in iter_images(out):
        vecs.setdefault(group["identity"], []).append(emb.embed_image(image[schema.CROP], image[schema.META]["crop_bbox"]))
    same = np.linalg.norm(vecs["df_1"][0] - vecs["df_1"][1])
    other = np.linalg.norm(vecs["df_1"][0] - vecs["fr_obama"][0])
    assert same < ident.DLIB_THRESHOLD < other


def test_build_flags_and_drops_the_intruder(mixed, tmp_path):
    flagged = run_build(build_opts(mixed, tmp_path / "flag", verify_identities=True))
    checks = {im[schema.META]["source"]: im[schema.META]["identity_check"] for _, im in iter_images(tmp_path / "flag")}
    assert checks["df_1/intruder.jpg"]["ok"] is False and checks["df_1/intruder.jpg"]["model"] == "dlib"
    assert all(c["ok"] for s, c in checks.items() if s.startswith("df_1/img"))
    assert flagged["counts"]["accepted"] == 11
    dropped = run_build(build_opts(mixed, tmp_path / "drop", verify_identities=True, drop_mismatched=True))
    assert dropped["rejects_by_reason"].get(records.IDENTITY_MISMATCH) == 1
    assert dropped["counts"]["accepted"] + dropped["counts"]["rejected"] == dropped["counts"]["found"]


def test_verify_identities_command(mixed, tmp_path):
    out = tmp_path / "out"
    run_build(build_opts(mixed, out))
    rows = verify_dataset(out)
    bad = [r for r in rows if not r["ok"]]
    assert [r["source"] for r in bad] == ["df_1/intruder.jpg"]
    report = tmp_path / "report.jsonl"
    result = CliRunner().invoke(app, ["verify-identities", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "1 of 11 images flagged" in result.output and "intruder" in result.output
    assert len(report.read_text().splitlines()) == 11

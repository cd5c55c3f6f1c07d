"""`fact-data build --val-identities`: whole identities held out into their own shard set, never trained on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.holdout import choose_held_out, parse_val_identities
from dt_helpers import RAW, one_error_line
from fact_lightning.data import schema, shards
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.errors import UserError

FACT_DATA = str(Path(sys.executable).parent / "fact-data")
IDENTITIES = sorted(p.name for p in RAW.iterdir() if p.is_dir())


def fact_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FACT_DATA, *args], capture_output=True, text=True, timeout=300)


def build(out: Path, *args: str) -> subprocess.CompletedProcess:
    return fact_data("build", "--src", str(RAW), "--out", str(out), "--encoder", "tiny", "--random-encoder",
                     "--resolution", "64", "--images-per-shard", "4", *args)


def identities_in(root: Path) -> set[str]:
    """The identity of every sample in the shards the manifest lists (what a training reader sees)."""
    names = set()
    for url in shards.shard_urls(root, shards.read_manifest(root)):
        for sample in shards.iter_raw_samples(url):
            info, images = schema.split_group(sample)
            names.add(json.loads(info)["identity"])
            names.update(json.loads(image[schema.META])["identity"] for image in images)
    return names


@pytest.fixture(scope="module")
def split_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split") / "shards"
    done = build(out, "--val-identities", "2", "--val-seed", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held out 2 identities" in done.stdout
    return out


@pytest.mark.slow  # a build of the sample photos (5-15 s)
def test_held_out_identities_go_to_their_own_shard_set(split_build):
    train, val = shards.read_manifest(split_build), shards.read_manifest(split_build / "val")
    held = train["split"]["held_out"]
    assert held == val["split"]["held_out"] == choose_held_out(IDENTITIES, 2, seed=3)
    assert train["split"]["role"] == "train" and val["split"]["role"] == "val"
    # The shards' own contents: no held-out person in the training shards, only held-out ones in val.
    assert identities_in(split_build) == set(IDENTITIES) - set(held)
    assert identities_in(split_build / "val") == set(held)
    # Every photo is counted once, in one of the two manifests.
    found = sum(len(list((RAW / name).iterdir())) for name in IDENTITIES)
    assert train["counts"]["found"] + val["counts"]["found"] == found
    assert set(val["identities"]) == set(held) and not set(train["identities"]) & set(held)


@pytest.mark.slow  # a build of the sample photos (5-15 s)
def test_training_on_out_never_reads_the_held_out_set(split_build):
    data = FactDataModule(str(split_build), batch_size=1, streaming=False, num_workers=0, encoder="tiny",
                          val_root=str(split_build / "val"))
    data.setup("fit")
    held = set(shards.read_manifest(split_build)["split"]["held_out"])
    trained = {sample["key"] for sample in data._train.samples}
    validated = {sample["key"] for sample in data._val.samples}
    assert trained and validated
    assert all(Path(url).parent == split_build for url in shards.shard_urls(split_build, data.manifest))
    assert identities_in(split_build).isdisjoint(held)
    assert len(data._val) == shards.read_manifest(split_build / "val")["counts"]["images"]


@pytest.mark.slow  # a build of the sample photos (5-15 s)
def test_inspect_checks_both_sets(split_build):
    for root in (split_build, split_build / "val"):
        done = fact_data("inspect", str(root))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "BAD" not in done.stdout


@pytest.mark.slow  # a build of the sample photos (5-15 s)
def test_named_identities_are_held_out_into_val_out(tmp_path):
    out, val = tmp_path / "shards", tmp_path / "held"
    done = build(out, "--val-identities", "fr_obama,df_2", "--val-out", str(val))
    assert done.returncode == 0, done.stderr[-3000:]
    assert identities_in(val) == {"fr_obama", "df_2"}
    assert not (out / "val").exists()
    assert identities_in(out) == set(IDENTITIES) - {"fr_obama", "df_2"}


@pytest.mark.parametrize("args, words", [
    (["--val-identities", str(len(IDENTITIES))], ["--val-identities", "fewer than"]),
    (["--val-identities", "fr_obama,nobody"], ["nobody"]),
    (["--val-identities", "fr_obama,,df_1"], ["--val-identities"]),
    (["--val-identities", "0"], ["--val-identities"]),
    (["--val-out", "elsewhere"], ["--val-out", "--val-identities"]),
])
def test_bad_hold_out_is_one_line(tmp_path, args, words):
    out = tmp_path / "shards"
    line = one_error_line(build(out, *args))
    for word in words:
        assert word in line, line
    assert not (out / shards.MANIFEST_NAME).exists()


def test_the_draw_depends_only_on_the_names_and_the_seed():
    names = [f"person{i:03d}" for i in range(50)]
    first = choose_held_out(names, 5, seed=0)
    assert first == choose_held_out(list(reversed(names)), 5, seed=0)  # not on input order
    assert len(first) == 5 and first == sorted(first)
    assert any(choose_held_out(names, 5, seed=s) != first for s in range(1, 5))
    assert parse_val_identities(" 3 ") == 3 and parse_val_identities("a, b") == ("a", "b")
    with pytest.raises(ValueError, match="twice"):
        parse_val_identities("a,a")
    with pytest.raises(UserError, match="'c'"):
        choose_held_out(["a", "b"], ("c",), seed=0)

"""`fact-data` accounts for every file it finds (accepted, or rejected with a reason: accepted + rejected ==
found, in the manifest and in the summary), and a file whose shape is wrong (a CSV row with another column
count, a caption template with an unknown placeholder, a manifest field of the wrong type) is one error line
naming it, exit 2, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools import sources
from data_tools.sources import NOT_A_FILE, UNREADABLE_FOLDER, UNSUPPORTED_FORMAT, decodable_extensions, discover
from dt_helpers import FACE_PHOTO, RAW, one_error_line
from fact_lightning.data import shards
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.faces.decode import NOT_AN_IMAGE

pytestmark = pytest.mark.timeout(120)
FACT_DATA = str(Path(sys.executable).parent / "fact-data")
ENV = {**os.environ, "GLOG_minloglevel": "2", "COLUMNS": "200"}
TINY = ["--encoder", "tiny", "--random-encoder"]


def fact_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FACT_DATA, *args], capture_output=True, text=True, timeout=120, env=ENV)


def _one_of_each(src: Path) -> dict[str, str | None]:
    """A source tree with one file of each kind; {relative path: expected reject reason, None: accepted}."""
    ok, odd = src / "ok", src / "odd"
    ok.mkdir(parents=True)
    odd.mkdir()
    shutil.copy(FACE_PHOTO, ok / "face.jpg")
    (ok / "face.txt").write_text("a caption")  # a sidecar caption: part of its photo, not a file of its own
    expected: dict[str, str | None] = {"ok/face.jpg": None}
    if ".avif" in decodable_extensions():  # a format this Pillow decodes is accepted
        Image.open(FACE_PHOTO).save(ok / "face.avif")
        expected["ok/face.avif"] = None
    (odd / "text.jpg").write_text("not an image\n")
    expected["odd/text.jpg"] = NOT_AN_IMAGE
    if ".heic" not in decodable_extensions():  # a format it cannot decode: said so, not ignored
        (odd / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
        expected["odd/photo.heic"] = UNSUPPORTED_FORMAT
    (odd / "notes.md").write_text("# notes\n")
    (odd / "README").write_text("no extension\n")
    expected.update({"odd/notes.md": UNSUPPORTED_FORMAT, "odd/README": UNSUPPORTED_FORMAT})
    (odd / "gone").symlink_to(src.parent / "nowhere", target_is_directory=True)  # a folder that is a broken link
    (odd / "through_a_file").symlink_to(ok / "face.jpg" / "inner")  # a path component that is a file
    expected.update({"odd/gone": NOT_A_FILE, "odd/through_a_file": NOT_A_FILE})
    return expected


def test_discovery_gives_every_file_a_fate(tmp_path):
    expected = _one_of_each(tmp_path / "src")
    found = discover(tmp_path / "src")
    fates = {s.source: s.reason for s in found.skipped} | {i.source: None for i in found.items}
    # The photo with a bad body is an item here; the decoder rejects it (below, in the build).
    assert fates == {k: (None if v == NOT_AN_IMAGE else v) for k, v in expected.items()}
    assert found.found == len(expected)
    assert {i.source: i.caption for i in found.items}["ok/face.jpg"] == "a caption"


def test_a_folder_that_cannot_be_listed_is_a_reject(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(RAW / "fr_biden", src / "biden")
    shutil.copytree(RAW / "fr_obama", src / "obama")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "obama":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what chmod 000 does to a user other than root
    found = discover(src)
    assert [(s.source, s.identity, s.reason) for s in found.skipped] == [("obama", "obama", UNREADABLE_FOLDER)]
    assert "Permission denied" in found.skipped[0].detail and len(found.items) == 2


def _userns_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--user", "true"], capture_output=True, timeout=10).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_build_over_one_of_each_accounts_for_every_file():
    """As an unprivileged user (a user namespace: root reads through chmod 000), a build over one file of each
    kind and an unreadable folder: manifest, rejects.jsonl and the printed summary add up."""
    assert _userns_works(), "needs unshare --user (an unprivileged user for chmod 000 to bind), as CI has"
    base = Path(tempfile.mkdtemp(prefix="fact-accounting-"))
    try:
        base.chmod(0o755)
        src, outs = base / "src", base / "outs"
        expected = _one_of_each(src)
        locked = src / "locked"
        shutil.copytree(RAW / "fr_obama", locked)
        locked.chmod(0)
        expected["locked"] = UNREADABLE_FOLDER
        outs.mkdir(mode=0o777)
        outs.chmod(0o777)
        out = outs / "out"
        result = subprocess.run(["unshare", "--user", FACT_DATA, "build", "--src", str(src), "--out", str(out), *TINY],
                                capture_output=True, text=True, timeout=200, env={**ENV, "HOME": str(outs)})
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = shards.read_manifest(out)
        c = manifest["counts"]
        rejects = {r["source"]: r["reason"] for r in map(json.loads, (out / shards.REJECTS_NAME).read_text().splitlines())}
        assert rejects == {k: v for k, v in expected.items() if v is not None}
        assert c["found"] == len(expected) and c["accepted"] == sum(v is None for v in expected.values())
        assert c["accepted"] + c["rejected"] == c["found"]
        assert f"{c['found']} files found = {c['accepted']} accepted + {c['rejected']} rejected" in result.stdout
        assert manifest["identities"]["locked"] == {"found": 1, "accepted": 0, "groups": 0}
        assert sum(row["found"] for row in manifest["identities"].values()) == c["found"]
    finally:
        (base / "src" / "locked").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# --- wrong shapes: one line, nothing written ------------------------------------------------------------------
@pytest.mark.parametrize("rows,says", [
    ("path,identity\n{p},a,extra\n", ":2: 3 columns, the header has 2"),
    ("path,identity,caption\n{p},a,one\n{p}\n", ":3: 1 columns, the header has 3"),
    ("file,person\n{p},a\n", "lacks path and identity"),
    ("", "lacks path and identity"),
])
def test_a_csv_list_with_the_wrong_columns_is_one_line(tmp_path, rows, says):
    listing = tmp_path / "list.csv"
    listing.write_text(rows.format(p=FACE_PHOTO))
    with pytest.raises(ValueError, match=str(listing)):
        sources.read_list(listing)
    line = one_error_line(fact_data("build", "--src", str(listing), "--out", str(tmp_path / "out"), *TINY))
    assert str(listing) in line and says in line, line
    assert not (tmp_path / "out").exists()


def test_a_caption_template_with_an_unknown_placeholder_is_one_line(tmp_path):
    line = one_error_line(fact_data("build", "--src", str(RAW), "--out", str(tmp_path / "out"), *TINY,
                                    "--caption-template", "a photo of {name}"))
    assert "--caption-template" in line and "{name}" in line and "{identity}" in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_shards(root, identities=2, images_per_identity=2, groups_per_shard=1, resolution=64)
    return root


def _set(path: str, value):
    """A change to the manifest: ``value`` at a dotted ``path`` (``shards.0.samples``)."""
    def change(manifest: dict) -> None:
        *parents, last = path.split(".")
        holder = manifest
        for part in parents:
            holder = holder[int(part)] if part.isdigit() else holder[part]
        holder[int(last) if last.isdigit() else last] = value
    return change


@pytest.mark.parametrize("change,says", [
    (_set("shards", "shard-000000.tar"), "field 'shards' must be a list, got str"),
    (_set("counts.found", "4"), "field counts.found must be an integer, got str"),
    (_set("shards.0.samples", "1"), "field shards[0].samples must be an integer, got str"),
    (_set("shards.0", "shard-000000.tar"), "shards[0] must be an object, got str"),
    (_set("encoder.token_shape", [144, "64"]), "field encoder.token_shape must be a list of integers"),
    (_set("format_version", True), "field 'format_version' must be an integer, got bool"),
    (_set("options.record.resolution", 64.5), "field options.record.resolution must be an integer, got float"),
], ids=["shards_str", "count_str", "samples_str", "entry_str", "token_shape", "version_bool", "resolution_float"])
def test_a_manifest_field_of_the_wrong_type_is_one_line_for_every_reader(synthetic, tmp_path, capsys, change, says):
    """fact-data's readers (in process, through the console scripts' runner) and the training data module."""
    from data_tools.cli import app
    from fact_lightning.commands.cli_errors import run_app
    from fact_lightning.data.datamodule import FactDataModule

    root = tmp_path / "data"
    shutil.copytree(synthetic, root)
    manifest = json.loads((root / shards.MANIFEST_NAME).read_text())
    change(manifest)
    (root / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
    before = sorted(p.name for p in root.iterdir())
    for command in (["inspect", str(root)], ["add-latents", str(root), "--vae", "tiny"]):
        status, err = run_app(app, command), capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert str(root / shards.MANIFEST_NAME) in lines[0] and says in lines[0], lines[0]
    with pytest.raises(shards.ManifestError) as raised:
        FactDataModule(str(root), batch_size=1, token_dim=64).check()
    assert says in str(raised.value)
    assert sorted(p.name for p in root.iterdir()) == before  # nothing half-written

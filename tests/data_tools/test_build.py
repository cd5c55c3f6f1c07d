"""Build from the real fixture photos and check the output invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.build import run_build
from data_tools.plan import plan_shards, split_groups
from data_tools.dataset import iter_images
from fact_lightning.interop.official import RANDOM_ENCODER_WARNING
from data_tools.sources import discover
from dt_helpers import RAW, build_opts
from fact_lightning.data import schema, shards


def _identities(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def test_manifest_counts_add_up(built):
    out, manifest = built
    c = manifest["counts"]
    assert c["found"] == sum(1 for p in RAW.rglob("*") if p.is_file())
    assert c["accepted"] + c["rejected"] == c["found"]
    assert manifest["rejects_by_reason"] == {"no_face": 1}  # df_4/img61.jpg: mediapipe misses it
    rejects = [json.loads(x) for x in (out / shards.REJECTS_NAME).read_text().splitlines()]
    assert rejects == [{"source": "df_4/img61.jpg", "identity": "df_4", "reason": "no_face", "detail": ""}]
    assert sum(s["images"] for s in manifest["shards"]) == c["accepted"]
    assert sum(s["samples"] for s in manifest["shards"]) == c["samples"]
    assert set(manifest["identities"]) == _identities(RAW)
    assert all(v["accepted"] >= 1 for v in manifest["identities"].values())
    assert manifest["identities"]["df_1"] == {"found": 3, "accepted": 3, "groups": 2}  # max_per_group=2
    assert set(schema.MANIFEST_KEYS) <= set(manifest)
    assert manifest["encoder"]["random"] and RANDOM_ENCODER_WARNING in manifest["warnings"]
    assert manifest["encoder"]["token_shape"] == [144, 64]
    assert len(manifest["shards"]) >= 3 and all((out / s["name"]).is_file() for s in manifest["shards"])
    assert not list(out.glob("*.tmp"))


def test_every_image_is_consistent(built):
    out, manifest = built
    seen_ids, n = set(), 0
    for group, image in iter_images(out):
        n += 1
        seen_ids.add(group["identity"])
        meta = image[schema.META]
        assert set(schema.META_KEYS) <= set(meta)
        assert meta["identity"] == group["identity"] and meta["source"].startswith(group["identity"] + "/")
        crop, mask, face, tokens = (image[k] for k in (schema.CROP, schema.MASK, schema.FACE, schema.TOKENS))
        assert crop.shape == (512, 512, 3) and mask.shape == (512, 512) and face.shape == (112, 112, 3)
        assert tokens.shape == (144, 64) and tokens.dtype == np.float16 and np.isfinite(tokens).all()
        assert set(np.unique(mask)) <= {0, 255}
        inside = mask > 0
        assert 0.02 < inside.mean() < 0.6, meta["source"]
        # The mask lies within the face box (a little slack for the oval's chin/forehead points).
        x0, y0, x1, y1 = meta["crop_bbox"]
        ys, xs = np.nonzero(inside)
        w, h = x1 - x0, y1 - y0
        assert xs.min() >= x0 - 0.25 * w and xs.max() <= x1 + 0.25 * w
        assert ys.min() >= y0 - 0.5 * h and ys.max() <= y1 + 0.25 * h
        # Landmarks inside the face box, in ArcFace order (image-left eye left of image-right eye, eyes
        # above nose above mouth), both in source and crop coordinates.
        for box, lm in ((meta["bbox"], meta["landmarks"]), (meta["crop_bbox"], meta["crop_landmarks"])):
            lm = np.array(lm)
            assert (lm[:, 0] >= box[0]).all() and (lm[:, 0] <= box[2]).all()
            assert (lm[:, 1] >= box[1]).all() and (lm[:, 1] <= box[3]).all()
            assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
            assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()
        # Aligned face: the landmarks land on the ArcFace template; background is zeroed.
        m = np.array(meta["align_matrix"])
        aligned = np.array(meta["landmarks"]) @ m[:, :2].T + m[:, 2]
        from fact_lightning.faces.alignment import ARCFACE_TEMPLATE
        assert np.abs(aligned - ARCFACE_TEMPLATE).max() < 8
        assert (face[0, 0] == 0).all() and face[56, 56].max() > 0
        assert meta["caption"] == "a photo of a person" and len(meta["source_sha256"]) == 64
    assert seen_ids == _identities(RAW)
    assert n == manifest["counts"]["accepted"]


def test_shards_read_with_webdataset_pipeline(built):
    out, manifest = built
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("rgb8"))
    samples = list(pipe)
    assert len(samples) == manifest["counts"]["samples"]
    group, images = schema.split_group(samples[0])
    assert group["num_images"] == len(images) and images[0][schema.CROP].shape == (512, 512, 3)
    assert images[0][schema.TOKENS].dtype == np.float16


def test_same_inputs_same_bytes_for_any_worker_count(built, tmp_path):
    out, manifest = built
    again = run_build(build_opts(RAW, tmp_path / "w2", images_per_shard=4, max_per_group=2, workers=2))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    for s in manifest["shards"]:
        assert (out / s["name"]).read_bytes() == (tmp_path / "w2" / s["name"]).read_bytes()


def test_resume_skips_finished_shards_and_redoes_changed_ones(built, raw_copy, tmp_path):
    out = tmp_path / "out"
    opts = build_opts(raw_copy, out, images_per_shard=4, max_per_group=2)
    first = run_build(opts)
    assert first["resumed_shards"] == 0
    second = run_build(opts)
    assert second["resumed_shards"] == len(plan_shards(discover(raw_copy).items, 4))
    assert second["shards"] == first["shards"]
    # A sidecar caption changes one identity's plan: only that shard is rebuilt.
    (raw_copy / "fr_obama" / "1.txt").write_text("a portrait of the president\n")
    third = run_build(opts)
    assert third["resumed_shards"] == second["resumed_shards"] - 1
    metas = [im[schema.META] for _, im in iter_images(out) if im[schema.META]["source"] == "fr_obama/1.jpg"]
    assert metas[0]["caption"] == "a portrait of the president"
    # --no-resume rebuilds everything.
    assert run_build(build_opts(raw_copy, out, images_per_shard=4, max_per_group=2, resume=False))["resumed_shards"] == 0


def test_manifest_sources_csv_and_jsonl(tmp_path):
    rows = [("df_2/img44.jpg", "kp", "caption one"), ("df_2/img46.jpg", "kp", ""), ("fr_biden/1.jpg", "jb", "")]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,identity,caption\n" + "".join(f"{RAW / p},{i},{c}\n" for p, i, c in rows))
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"path": str(RAW / p), "identity": i, "caption": c}) + "\n" for p, i, c in rows))
    a = run_build(build_opts(csv_path, tmp_path / "a", caption_template="photo of {identity}"))
    b = run_build(build_opts(jsonl, tmp_path / "b", caption_template="photo of {identity}"))
    assert a["counts"]["accepted"] == 3 and a["shards"] == b["shards"]
    captions = sorted(im[schema.META]["caption"] for _, im in iter_images(tmp_path / "a"))
    assert captions == ["caption one", "photo of jb", "photo of kp"]


def test_nested_folders_and_sidecars(tmp_path):
    src = tmp_path / "src"
    (src / "alice" / "2020" / "summer").mkdir(parents=True)
    (src / "alice" / "2020" / "summer" / "a.jpg").write_bytes((RAW / "df_1" / "img5.jpg").read_bytes())
    (src / "alice" / "2020" / "summer" / "a.jpg.txt").write_text("alice at the beach")
    found = discover(src)
    assert [(i.identity, i.source, i.caption) for i in found.items] == [("alice", "alice/2020/summer/a.jpg", "alice at the beach")]
    assert found.skipped == []


def test_missing_weights_stop_with_clear_message(tmp_path):
    with pytest.raises(ValueError, match="--encoder-weights"):
        run_build(build_opts(RAW, tmp_path / "o", random_encoder=False))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run_build(build_opts(RAW, tmp_path / "o", encoder_weights=tmp_path / "nope.pt"))


def test_split_groups_and_plan():
    assert [len(r) for r in split_groups(17, 8)] == [6, 5, 6]
    assert [len(r) for r in split_groups(3, 16)] == [3]
    items = discover(RAW).items
    plan = plan_shards(items, 4)
    assert sum(len(s.items) for s in plan) == len(items)
    for shard in plan:  # identities never split across shards
        ids = {i.identity for i in shard.items}
        assert all(sum(1 for s in plan if any(i.identity == name for i in s.items)) == 1 for name in ids)


def test_unexpected_error_in_one_photo_becomes_a_reject(tmp_path, monkeypatch):
    from data_tools import build, records

    real = records.process_item

    def flaky(item, *args, **kwargs):
        if item.source == "fr_biden/2.jpg":
            raise RuntimeError("boom")
        return real(item, *args, **kwargs)

    monkeypatch.setattr(records, "process_item", flaky)
    src = tmp_path / "src"
    import shutil
    shutil.copytree(RAW / "fr_biden", src / "fr_biden")
    manifest = build.run_build(build_opts(src, tmp_path / "out"))
    assert manifest["rejects_by_reason"] == {records.PROCESSING_ERROR: 1}
    assert manifest["counts"]["accepted"] == 1

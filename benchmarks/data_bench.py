"""Data-side benchmark: photo processing, encoder features, shard reading.

    python -m benchmarks.data_bench --out bench_results/data_bench [--photos DIR] [--workers N]

Writes ``data_bench.json`` with
- ``photos_per_s_per_worker``: decode + detection + face mesh + masks + crop + alignment, one process;
- ``features_per_s``: TransFace tokens for aligned faces at batch 16 ("tiny" and "S", random weights);
- ``shard_read``: webdataset samples/s and images/s decoding the built shards (rgb8);
- ``build``: an end-to-end ``run_build`` with ``workers`` processes (photos/s);
- ``train_step_consumption_ratio``: left null here: the training side fills it in as shard images/s
  divided by the images one training step consumes per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = ROOT.parent / "shared" / "faces" / "raw"
FIXTURE_PHOTOS = ROOT / "tests" / "fixtures" / "faces" / "raw"


def default_photos() -> Path:
    return SHARED_PHOTOS if SHARED_PHOTOS.is_dir() else FIXTURE_PHOTOS


def bench_photos(photos: Path) -> dict:
    from fact_lightning.faces.detectors import create_detector
    from data_tools.records import ImageRecord, RecordOptions, process_item
    from data_tools.sources import discover

    items = discover(photos).items
    detector = create_detector("mediapipe")
    opts = RecordOptions()
    process_item(items[0], detector, opts)  # warm-up (graph init)
    start = time.perf_counter()
    accepted = sum(isinstance(process_item(i, detector, opts), ImageRecord) for i in items)
    elapsed = time.perf_counter() - start
    detector.close()
    return {"photos": len(items), "accepted": accepted, "seconds": round(elapsed, 3),
            "photos_per_s_per_worker": round(len(items) / elapsed, 2)}


def bench_encoder(variant: str, device: str, batch: int = 16, batches: int = 8) -> dict:
    from fact_lightning.faces.encoding import encode_faces
    from fact_lightning.models.face_encoder import build_transface

    model = build_transface(variant, seed=0).to(device)
    faces = np.random.default_rng(0).integers(0, 256, (batch * batches, 112, 112, 3), dtype=np.uint8)
    encode_faces(model, faces[:batch], device, batch)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = encode_faces(model, faces, device, batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"variant": variant, "batch": batch, "device": device, "token_shape": list(tokens.shape[1:]),
            "features_per_s": round(len(faces) / elapsed, 1)}


def bench_build_and_read(photos: Path, out: Path, workers: int) -> tuple[dict, dict]:
    import webdataset as wds

    from data_tools.build import BuildOptions, run_build
    from fact_lightning.data import schema

    shards = out / "shards"
    start = time.perf_counter()
    manifest = run_build(BuildOptions(src=photos, out=shards, encoder="tiny", random_encoder=True,
                                      workers=workers, resume=False, images_per_shard=16))
    build_s = time.perf_counter() - start
    build = {"workers": workers, "photos": manifest["counts"]["found"], "seconds": round(build_s, 2),
             "photos_per_s": round(manifest["counts"]["found"] / build_s, 2),
             "note": "includes process start-up and model loading"}
    urls = [str(shards / s["name"]) for s in manifest["shards"]]
    reads, n_samples, n_images, start = 3, 0, 0, time.perf_counter()
    for _ in range(reads):
        pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("rgb8"))
        for sample in pipe:
            n_samples += 1
            n_images += len(schema.split_group(sample)[1])
    elapsed = time.perf_counter() - start
    read = {"samples_per_s": round(n_samples / elapsed, 1), "images_per_s": round(n_images / elapsed, 1),
            "images_per_sample": round(n_images / max(n_samples, 1), 2), "decode": "rgb8 (crop, mask, face, tokens)"}
    return build, read


def run(out_dir: Path | str, photos: Path | None = None, workers: int | None = None) -> dict:
    """Run the data benchmark; returns the result dict (the caller writes it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = Path(photos) if photos else default_photos()
    workers = workers or min(2, os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"photos_dir": str(photos), "device": device, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}
    result["processing"] = bench_photos(photos)
    result["photos_per_s_per_worker"] = result["processing"]["photos_per_s_per_worker"]
    result["encoder"] = [bench_encoder("tiny", device), bench_encoder("S", device)]
    result["features_per_s"] = {e["variant"]: e["features_per_s"] for e in result["encoder"]}
    result["build"], result["shard_read"] = bench_build_and_read(photos, out, workers)
    result["shard_read_samples_per_s"] = result["shard_read"]["samples_per_s"]
    result["train_step_consumption_ratio"] = None  # filled in by the training benchmark (train_bench)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_results") / "data_bench")
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("GLOG_minloglevel", "2")
    result = run(args.out, args.photos, args.workers)
    path = args.out / "data_bench.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

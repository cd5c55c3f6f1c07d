"""`fact-data build` orchestration: plan shards, process photos (optionally in worker processes), encode
faces, verify identities, write shards, stats, rejects and the manifest.

Determinism: inputs are sorted and planned into shards by identity before any work (an identity never
spans two shards); every record depends only on its own file and the options; features are computed per
shard in fixed batches. So output is independent of ``workers``, and a resumed build, which skips every
shard whose stats file (written last) matches the plan, ends with the same shards as a clean one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fact_lightning.faces import identity as ident
from data_tools import records, stats
from fact_lightning.faces.encoding import encode_faces, embed_tokens
from fact_lightning.interop.official import RANDOM_ENCODER_WARNING, load_encoder
from data_tools.records import ImageRecord, Reject, RecordOptions
from data_tools.sources import DEFAULT_CAPTION_TEMPLATE, SourceItem, discover
from data_tools.writer import AtomicShardWriter, group_sample
from fact_lightning.data import schema

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]
_SHARD_FILE = re.compile(r"^shard-\d{6}(\.tar|\.stats\.json)(\.tmp)?$")


@dataclass(frozen=True)
class BuildOptions:
    src: Path
    out: Path
    record: RecordOptions = field(default_factory=RecordOptions)
    detector: str = "mediapipe"
    detector_weights: Path | None = None
    encoder: str = "S"
    encoder_weights: Path | None = None
    random_encoder: bool = False
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    max_per_group: int = 16
    images_per_shard: int = 512
    workers: int = 1
    batch_size: int = 32
    device: str = "auto"
    resume: bool = True
    verify_identities: bool = False
    drop_mismatched: bool = False
    identity_model: str = "auto"
    identity_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.max_per_group < 1 or self.images_per_shard < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("max_per_group, images_per_shard, workers and batch_size must be >= 1")
        if self.identity_model not in ("auto", "dlib", "transface"):
            raise ValueError(f"identity_model must be auto, dlib or transface, got {self.identity_model!r}")
        if self.drop_mismatched and not self.verify_identities:
            raise ValueError("drop_mismatched needs verify_identities")

    def fingerprint(self) -> dict:
        """Options that change shard contents (not paths, workers, device or resume)."""
        return {"record": self.record.to_dict(), "detector": self.detector, "encoder": self.encoder,
                "max_per_group": self.max_per_group, "verify_identities": self.verify_identities,
                "drop_mismatched": self.drop_mismatched, "identity_model": self.identity_model,
                "identity_threshold": self.identity_threshold}

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def plan_shards(items: list[SourceItem], images_per_shard: int) -> list[list[SourceItem]]:
    """Consecutive identities packed into shards of about ``images_per_shard`` inputs each."""
    by_id: dict[str, list[SourceItem]] = {}
    for item in items:
        by_id.setdefault(item.identity, []).append(item)
    shards, current = [], []
    for name in sorted(by_id):
        if current and len(current) + len(by_id[name]) > images_per_shard:
            shards.append(current)
            current = []
        current.extend(by_id[name])
    if current:
        shards.append(current)
    return shards


def split_groups(n: int, max_per_group: int) -> list[range]:
    """Index ranges of ceil(n / max) near-equal groups."""
    k = max(1, -(-n // max_per_group))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [range(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]


# --- worker side -------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(detector: str, weights: Path | None, record_opts: RecordOptions, dlib_embed: bool) -> None:
    from fact_lightning.faces.detectors import create_detector

    _WORKER["detector"] = create_detector(detector, weights)
    _WORKER["opts"] = record_opts
    _WORKER["embedder"] = ident.DlibEmbedder() if dlib_embed else None


def _process(item: SourceItem) -> ImageRecord | Reject:
    try:
        return records.process_item(item, _WORKER["detector"], _WORKER["opts"], _WORKER["embedder"])
    except Exception as exc:  # noqa: BLE001 - per-sample error handler: one bad photo must not end a build
        logger.exception("unexpected error on %s", item.source)
        return Reject(item.source, item.identity, records.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}")


class _Processor:
    """Maps items to records in order, in this process or in a spawn pool of ``workers`` processes."""

    def __init__(self, opts: BuildOptions, dlib_embed: bool):
        args = (opts.detector, opts.detector_weights, opts.record, dlib_embed)
        self._pool = None
        if opts.workers > 1:
            self._pool = mp.get_context("spawn").Pool(opts.workers, initializer=_init_worker, initargs=args)
        else:
            _init_worker(*args)

    def map(self, items: list[SourceItem]) -> Iterator[ImageRecord | Reject]:
        if self._pool is None:
            return map(_process, items)
        return self._pool.imap(_process, items, chunksize=1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


# --- main side ---------------------------------------------------------------------------------------
def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _plan_hash(opts: BuildOptions, encoder: dict, shard: list[SourceItem]) -> str:
    payload = {"format_version": schema.FORMAT_VERSION, "options": opts.fingerprint(),
               "encoder": {k: encoder[k] for k in ("variant", "weights_sha256", "random")},
               "items": [i.fingerprint() for i in shard]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _clean_out(out: Path, keep: set[str], resume: bool) -> None:
    for name in (schema.MANIFEST_NAME, schema.MANIFEST_NAME + ".tmp", schema.REJECTS_NAME + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for path in out.iterdir():
        if _SHARD_FILE.match(path.name) and (not resume or path.name not in keep or path.name.endswith(".tmp")):
            logger.info("removing %s", path)
            path.unlink()


class _Builder:
    def __init__(self, opts: BuildOptions, progress: ProgressFn | None):
        self.opts = opts
        self.progress = progress or (lambda n: None)
        self.device = _resolve_device(opts.device)
        self.model, info = load_encoder(opts.encoder, opts.encoder_weights, opts.random_encoder)
        self.model.to(self.device)
        self.encoder = {**info.to_dict(), "token_shape": [self.model.num_tokens, self.model.token_dim],
                        "token_dtype": schema.TOKENS_DTYPE}
        model_name = opts.identity_model
        if model_name == "auto":
            model_name = "dlib" if info.random else "transface"
        if opts.verify_identities and model_name == "transface" and info.random:
            raise ValueError("identity checks with TransFace need real --encoder-weights; use --identity-model dlib")
        self.identity_model = model_name if opts.verify_identities else None
        self.processor: _Processor | None = None

    def process_shard(self, index: int, items: list[SourceItem], plan_hash: str) -> dict:
        start = time.perf_counter()
        if self.processor is None:  # started lazily: a fully resumed build spawns nothing
            self.processor = _Processor(self.opts, dlib_embed=self.identity_model == "dlib")
        accepted: list[ImageRecord] = []
        rejects: list[Reject] = []
        seen: set[tuple[str, str]] = set()
        for result in self.processor.map(items):
            self.progress(1)
            if isinstance(result, Reject):
                rejects.append(result)
                continue
            key = (result.identity, result.meta["source_sha256"])
            if key in seen:
                rejects.append(Reject(result.source, result.identity, records.DUPLICATE,
                                      "same bytes as an earlier image of this identity"))
                continue
            seen.add(key)
            accepted.append(result)
        faces = np.stack([r.face for r in accepted]) if accepted else np.zeros((0, 112, 112, 3), np.uint8)
        tokens = list(encode_faces(self.model, faces, self.device, self.opts.batch_size))
        accepted, tokens = self._verify(accepted, tokens, rejects)
        return self._write(index, items, accepted, tokens, rejects, plan_hash, time.perf_counter() - start)

    def _verify(self, accepted, tokens, rejects):
        if self.identity_model is None or not accepted:
            return accepted, tokens
        if self.identity_model == "transface":
            embeddings = list(embed_tokens(self.model, np.stack(tokens), self.device))
            metric, default = "cosine", ident.TRANSFACE_THRESHOLD
        else:
            embeddings = [r.embedding for r in accepted]
            metric, default = "euclidean", ident.DLIB_THRESHOLD
        threshold = self.opts.identity_threshold or default
        keep = [True] * len(accepted)
        by_id: dict[str, list[int]] = {}
        for i, r in enumerate(accepted):
            by_id.setdefault(r.identity, []).append(i)
        for idx in by_id.values():
            for i, check in zip(idx, ident.check_identity([embeddings[i] for i in idx], threshold, metric)):
                accepted[i].meta["identity_check"] = {"model": self.identity_model, "distance": check.distance,
                                                      "threshold": threshold, "ok": check.ok}
                if not check.ok and self.opts.drop_mismatched:
                    keep[i] = False
                    rejects.append(Reject(accepted[i].source, accepted[i].identity, records.IDENTITY_MISMATCH,
                                          f"{metric} distance {check.distance} > {threshold}"))
        return [r for r, k in zip(accepted, keep) if k], [t for t, k in zip(tokens, keep) if k]

    def _write(self, index, items, accepted, tokens, rejects, plan_hash, elapsed) -> dict:
        out = self.opts.out
        by_id: dict[str, list[int]] = {}
        for i, r in enumerate(accepted):
            by_id.setdefault(r.identity, []).append(i)
        counts = {name: {"found": 0, "accepted": 0, "groups": 0} for name in sorted({i.identity for i in items})}
        for item in items:
            counts[item.identity]["found"] += 1
        samples = 0
        with AtomicShardWriter(out / stats.shard_name(index)) as writer:
            for name in sorted(by_id):
                idx = by_id[name]
                for g, part in enumerate(split_groups(len(idx), self.opts.max_per_group)):
                    members = [idx[j] for j in part]
                    writer.write(group_sample(f"{index:06d}_{samples:04d}", name, g,
                                              [accepted[j] for j in members], [tokens[j] for j in members]))
                    samples += 1
                counts[name]["accepted"] = len(idx)
                counts[name]["groups"] = g + 1
        rejects.sort(key=lambda r: r.source)
        shard_stats = {
            "format_version": schema.FORMAT_VERSION, "name": stats.shard_name(index), "plan_hash": plan_hash,
            "found": len(items), "images": len(accepted), "samples": samples, "identities": counts,
            "rejects": [r.to_dict() for r in rejects], "sha256": writer.sha256,
            "tar_bytes": (out / stats.shard_name(index)).stat().st_size, "elapsed_s": round(elapsed, 3),
        }
        stats.write_json_atomic(stats.stats_path(out, index), shard_stats)  # last: marks the shard done
        return shard_stats

    def close(self) -> None:
        if self.processor is not None:
            self.processor.close()


def run_build(opts: BuildOptions, progress: ProgressFn | None = None,
              on_plan: Callable[[int, int], None] | None = None) -> dict:
    """Build the dataset in ``opts.out``; returns the manifest (also written to manifest.json, last)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    items, orphans = discover(opts.src, opts.caption_template)
    plan = plan_shards(items, opts.images_per_shard)
    if on_plan:
        on_plan(len(items) + len(orphans), len(plan))
    builder = _Builder(opts, progress)
    hashes = [_plan_hash(opts, builder.encoder, shard) for shard in plan]
    keep = {stats.shard_name(i) for i in range(len(plan))} | {stats.stats_path(out, i).name for i in range(len(plan))}
    _clean_out(out, keep, opts.resume)
    all_stats, resumed = [], 0
    try:
        for index, (shard, plan_hash) in enumerate(zip(plan, hashes)):
            done = stats.load_finished(out, index, plan_hash) if opts.resume else None
            if done is not None:
                resumed += 1
                (progress or (lambda n: None))(len(shard))
                logger.info("resume: %s already complete", done["name"])
            else:
                done = builder.process_shard(index, shard, plan_hash)
            all_stats.append(done)
    finally:
        builder.close()
    orphan_rejects = [Reject(o.source, "", records.NO_IDENTITY, "image directly under --src").to_dict()
                      for o in orphans]
    if orphans:
        (progress or (lambda n: None))(len(orphans))
    summary = stats.summarize(all_stats, orphan_rejects)
    stats.write_rejects(out, summary.pop("rejects"))
    warnings = [RANDOM_ENCODER_WARNING] if builder.encoder["random"] else []
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "tool": {"name": "fact-data", "version": _version()},
        "options": opts.to_dict(),
        "encoder": builder.encoder,
        "detector": {"name": opts.detector, "weights": str(opts.detector_weights) if opts.detector_weights else None},
        **summary,
        "warnings": warnings,
        "resumed_shards": resumed,
    }
    stats.write_json_atomic(out / schema.MANIFEST_NAME, manifest)
    return manifest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fact-lightning")
    except PackageNotFoundError:
        return "unknown"

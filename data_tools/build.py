"""`fact-data build` orchestration: discover inputs, plan shards (``plan.py``), process photos (``pool.py``),
encode faces, verify identities, write shards, stats, rejects and the manifest (``shards.py``).

Determinism: inputs are sorted and planned into shards by identity before any work; every record depends
only on its own file and the options; features are computed per shard in fixed batches. So output is
independent of ``workers``, and a resumed build, which keeps every shard whose stats (written last) match
the plan and whose bytes match their sha256, ends with the same shards as a clean one.

Safety: one build at a time per output folder (a lock); a shard is removed before it is rewritten and the
old manifest.json stays until the new one replaces it, so a reader of a half-rebuilt folder gets a clear
error, never a mix that looks complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_tools import latents, records, stats
from data_tools.output import os_errors, clean_tmp, locked_output, resolve_device
from data_tools.options import CONTENT_OPTIONS, BuildOptions, fingerprint
from data_tools.plan import IdentityPlan, ShardPlan, plan_shards, split_groups
from data_tools.pool import Processor
from data_tools.records import ImageRecord, Reject
from data_tools.sources import Discovery, discover
from fact_lightning.data import schema, shards
from fact_lightning.errors import UserError
from fact_lightning.faces import identity as ident
from fact_lightning.faces.encoding import embed_tokens, encode_faces
from fact_lightning.interop.official import RANDOM_ENCODER_WARNING, load_encoder

logger = logging.getLogger(__name__)
__all__ = ["BuildOptions", "run_build"]

ProgressFn = Callable[[int], None]
Pairs = list[tuple[ImageRecord, np.ndarray]]  # accepted records of one identity with their tokens


# --- the output folder -------------------------------------------------------------------------------
def _remove_extra_shards(out: Path, planned: int) -> None:
    """Shard files beyond the plan (an earlier, larger build): removed once the new manifest is in place."""
    keep = {shards.shard_name(i) for i in range(planned)} | {shards.stats_name(i) for i in range(planned)}
    for path in out.iterdir():
        if shards.SHARD_FILE_RE.match(path.name) and path.name not in keep:
            logger.info("removing %s (not part of this build)", path)
            path.unlink()


def _previous_manifest(out: Path) -> dict | None:
    try:
        return shards.read_manifest(out)
    except shards.ManifestError:
        return None


def _report_changes(out: Path, previous: dict | None, opts: BuildOptions, encoder: dict, vae: dict | None) -> None:
    if previous is None:
        return
    old, new = fingerprint(previous.get("options") or {}), opts.fingerprint()
    changed = [k for k in CONTENT_OPTIONS if old.get(k) != new.get(k)]
    old_enc = previous.get("encoder") or {}
    if old_enc.get("weights_sha256") != encoder.get("weights_sha256") or old_enc.get("variant") != encoder["variant"]:
        changed.append("encoder weights")
    if previous.get("vae") != vae:
        changed.append("cached latents (--vae)")
    if changed:
        logger.warning("options changed since the build in %s (%s): its shards will be rebuilt; the old %s stays "
                       "until the new build completes", out, ", ".join(changed), shards.MANIFEST_NAME)


# --- building ----------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, opts: BuildOptions, progress: ProgressFn):
        self.opts = opts
        self.progress = progress
        self.device = resolve_device(opts.device)
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
        self.processor: Processor | None = None
        self.vae, self.vae_info = None, None
        if opts.latents.vae is not None:
            import torch

            self.vae, info = latents.load_vae(opts.latents)
            torch.nn.Module.to(self.vae, self.device)
            self.vae_info = latents.with_shape(info, self.vae, opts.record.resolution)

    def process_shard(self, plan: ShardPlan) -> dict:
        start = time.perf_counter()
        if self.processor is None:  # started lazily: a fully resumed build spawns nothing
            o = self.opts
            self.processor = Processor(o.workers, o.detector, o.detector_weights, o.record,
                                       dlib_embed=self.identity_model == "dlib")
        results = self.processor.map(plan.items, label=plan.name)
        rejects: list[Reject] = []
        accepted: list[tuple[IdentityPlan, list[ImageRecord]]] = []
        for identity in plan.identities:
            kept, seen = [], set()
            for _ in identity.items:
                result = next(results)
                self.progress(1)
                if isinstance(result, Reject):
                    rejects.append(result)
                elif result.meta["source_sha256"] in seen:
                    rejects.append(Reject(result.source, result.identity, records.DUPLICATE,
                                          "same bytes as an earlier image of this identity"))
                else:
                    seen.add(result.meta["source_sha256"])
                    kept.append(result)
            accepted.append((identity, kept))
        flat = [r for _, kept in accepted for r in kept]
        faces = np.stack([r.face for r in flat]) if flat else np.zeros((0, 112, 112, 3), np.uint8)
        tokens = iter(list(encode_faces(self.model, faces, self.device, self.opts.batch_size)))
        groups = [(identity, [(r, next(tokens)) for r in kept]) for identity, kept in accepted]
        groups = self._verify(groups, rejects)
        return self._write(plan, groups, rejects, time.perf_counter() - start)

    def _verify(self, groups: list[tuple[IdentityPlan, Pairs]], rejects: list[Reject]):
        flat = [pair for _, pairs in groups for pair in pairs]
        if self.identity_model is None or not flat:
            return groups
        if self.identity_model == "transface":
            embeddings = iter(list(embed_tokens(self.model, np.stack([t for _, t in flat]), self.device)))
            metric, default = "cosine", ident.TRANSFACE_THRESHOLD
        else:
            embeddings = iter([r.embedding for r, _ in flat])
            metric, default = "euclidean", ident.DLIB_THRESHOLD
        threshold = self.opts.identity_threshold or default
        checked = []
        for identity, pairs in groups:
            kept = []
            for (record, tok), check in zip(pairs, ident.check_identity([next(embeddings) for _ in pairs], threshold,
                                                                        metric)):
                record.meta["identity_check"] = {"model": self.identity_model, "distance": check.distance,
                                                 "threshold": threshold, "ok": check.ok}
                if not check.ok and self.opts.drop_mismatched:
                    rejects.append(Reject(record.source, record.identity, records.IDENTITY_MISMATCH,
                                          f"{metric} distance {check.distance} > {threshold}"))
                else:
                    kept.append((record, tok))
            checked.append((identity, kept))
        return checked

    def _write(self, plan: ShardPlan, groups: list[tuple[IdentityPlan, Pairs]], rejects: list[Reject],
               elapsed: float) -> dict:
        out = self.opts.out
        counts, samples, images = {}, 0, 0
        path = out / plan.name
        planned = []  # (identity, group index, [(record, tokens)]) in file order
        for identity, pairs in groups:
            parts = split_groups(len(pairs), self.opts.max_per_group) if pairs else []
            planned += [(identity, g, [pairs[j] for j in part]) for g, part in enumerate(parts)]
            counts[identity.name] = {"found": len(identity.items), "accepted": len(pairs), "groups": len(parts)}
            images += len(pairs)
        cached = iter([None] * images)
        if self.vae is not None:  # in file order and fixed batches, as `fact-data add-latents` computes them
            crops = [record.crop_jpg for _, _, part in planned for record, _ in part]
            cached = iter(latents.encode_latents(self.vae, crops, self.device, self.opts.latents.vae_batch_size))
        with os_errors(f"cannot write {path}"):
            with shards.ShardWriter(path) as writer:
                for identity, g, part in planned:
                    fields = [shards.ImageFields(r.crop_jpg, r.mask_png, r.face_png, tok, r.meta, next(cached))
                              for r, tok in part]
                    writer.write(shards.group_sample(f"{plan.index:06d}_{samples:04d}", identity.name, g, fields))
                    samples += 1
            rejects.sort(key=lambda r: r.source)
            shard_stats = {
                "format_version": schema.FORMAT_VERSION, "name": plan.name, "plan_hash": plan.plan_hash,
                "found": len(plan.items), "images": images, "samples": samples, "identities": counts,
                "rejects": [r.to_dict() for r in rejects], "sha256": writer.sha256, "tar_bytes": writer.tar_bytes,
                "vae": self.vae_info, "elapsed_s": round(elapsed, 3),
            }
            shards.write_stats(out, plan.index, shard_stats)  # last: marks the shard done
        return shard_stats

    def close(self) -> None:
        if self.processor is not None:
            self.processor.close()


def _discover(opts: BuildOptions) -> Discovery:
    if not Path(opts.src).exists():
        raise UserError(f"--src not found: {opts.src}")
    found = discover(opts.src, opts.caption_template)
    if not found.items:
        reasons = sorted({s.reason for s in found.skipped})
        detail = f" ({found.found} found and skipped: {', '.join(reasons)})" if found.skipped else ""
        raise UserError(f"no usable photos in {opts.src}{detail}: put each person's photos in a folder "
                        f"src/<identity>/ or list them in a CSV/JSONL file")
    return found


def run_build(opts: BuildOptions, progress: ProgressFn | None = None,
              on_plan: Callable[[int, int], None] | None = None) -> dict:
    """Build the dataset in ``opts.out``; returns the manifest (also written to manifest.json, last)."""
    progress = progress or (lambda n: None)
    out = Path(opts.out)
    found = _discover(opts)
    with locked_output(out):
        builder = _Builder(opts, progress)
        salt = {"options": opts.fingerprint(),
                "encoder": {k: builder.encoder[k] for k in ("variant", "weights_sha256", "random")}}
        plan = plan_shards(found.items, opts.images_per_shard, salt)
        if on_plan:
            on_plan(found.found, len(plan))
        previous = _previous_manifest(out)
        _report_changes(out, previous, opts, builder.encoder, builder.vae_info)
        with os_errors(f"cannot write to --out {out}"):
            clean_tmp(out)
        all_stats, resumed = [], 0
        try:
            for shard in plan:
                done = (stats.load_finished(out, shard.index, shard.plan_hash, builder.vae_info)
                        if opts.resume else None)
                if done is not None:
                    resumed += 1
                    progress(len(shard.items))
                    logger.info("resume: %s already complete", done["name"])
                else:
                    shards.remove_shard(out, shard.index)  # the old manifest now fails loudly, not silently
                    done = builder.process_shard(shard)
                all_stats.append(done)
        finally:
            builder.close()
        progress(len(found.skipped))
        summary = stats.summarize(all_stats, [asdict(s) for s in found.skipped])
        manifest = {
            "format_version": schema.FORMAT_VERSION,
            "tool": {"name": "fact-data", "version": _version()},
            "options": opts.to_dict(),
            "encoder": builder.encoder,
            "vae": builder.vae_info,
            "detector": {"name": opts.detector,
                         "weights": str(opts.detector_weights) if opts.detector_weights else None},
            **{k: v for k, v in summary.items() if k != "rejects"},
            "warnings": [RANDOM_ENCODER_WARNING] if builder.encoder["random"] else [],
            "resumed_shards": resumed,
        }
        with os_errors(f"cannot write to --out {out}"):
            shards.write_rejects(out, summary["rejects"])
            shards.write_manifest(out, manifest)
            _remove_extra_shards(out, len(plan))
    return manifest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fact-lightning")
    except PackageNotFoundError:
        return "unknown"

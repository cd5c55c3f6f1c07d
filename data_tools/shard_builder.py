"""One shard of `fact-data build`: the photos processed (``pool.py``), faces encoded, identities verified,
latents cached, the shard and its stats written (``shards.py``). ``build.py`` imports it once the inputs were
found, so that a mistake in them ends the command before torch and the encoder load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_tools import latents, records
from data_tools.options import BuildOptions
from data_tools.output import os_errors, resolve_device
from data_tools.plan import IdentityPlan, ShardPlan, split_groups
from data_tools.pool import Processor
from data_tools.records import ImageRecord, Reject
from fact_lightning.data import schema, shards
from fact_lightning.faces import identity as ident
from fact_lightning.faces.encoding import embed_tokens, encode_faces
from fact_lightning.interop.official import RANDOM_ENCODER_WARNING, load_encoder

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]
Pairs = list[tuple[ImageRecord, np.ndarray]]  # accepted records of one identity with their tokens


class ShardBuilder:
    def __init__(self, opts: BuildOptions, progress: ProgressFn):
        self.opts = opts
        self.out = Path(opts.out)  # where shards go: --out, then the held-out set's folder (build.py sets it)
        self.progress = progress
        self.device = resolve_device(opts.device)
        self.model, info = load_encoder(opts.encoder, opts.encoder_weights, opts.random_encoder)
        self.model.to(self.device)
        self.encoder = {**info.to_dict(), "token_shape": [self.model.num_tokens, self.model.token_dim],
                        "token_dtype": schema.TOKENS_DTYPE}
        self.warnings = [RANDOM_ENCODER_WARNING] if info.random else []  # the manifest's
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
        """Builds one planned shard into ``self.out``."""
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
        return self._write(plan, groups, rejects, time.perf_counter() - start, self.out)

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
               elapsed: float, out: Path) -> dict:
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

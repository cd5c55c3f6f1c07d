"""``python -m fact_lightning.evaluation``: generate identities x prompts x seeds and score them like the paper.

Per (identity, prompt, seed) two images share the seed: with the adapter (scale a) and without (scale 0, which
is exactly the base model). Metrics: CLIP-T (adapter images vs prompts), CLIP-T of the base model and the
drop, CLIP-I (vs the identity's reference photos), face similarity, CLIP style (CLIP-I between with/without
adapter) and FID (adapter images vs base images, CLIP features by default: see ``metrics``). Writes
``OUT/metrics.json``, TensorBoard scalars under ``OUT/tensorboard`` and the images under ``OUT/images``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def build_parser() -> argparse.ArgumentParser:
    from fact_lightning.inference.cli import add_model_arguments, add_sampling_arguments

    parser = argparse.ArgumentParser(prog="python -m fact_lightning.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", required=True, help="folder of <identity>/<photo> reference photos")
    parser.add_argument("--max-identities", type=int, help="use the first N identities (sorted)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--clip", help="CLIP folder or hub id (e.g. openai/clip-vit-large-patch14); --tiny: random")
    parser.add_argument("--face-model", default="transface", choices=("transface", "dlib"))
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    return parser


def identity_photos(root: str | Path, limit: int | None = None) -> dict[str, list[Path]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identities folder not found: {root}")
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if photos:
            found[folder.name] = photos
    if not found:
        raise ValueError(f"{root} has no <identity>/<photo> folders")
    return dict(list(found.items())[:limit]) if limit else found


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from fact_lightning.faces.reference import NoFaceError
    from fact_lightning.inference.cli import prompts_from_args, read_rgb, sources_from_args
    from fact_lightning.inference.loading import load_generator

    from fact_lightning.tiny import tiny_clip

    from .clip import ClipScorer, clip_i, clip_t
    from .metrics import DlibFaceEmbedder, TransFaceEmbedder, face_similarity, fid

    if not args.clip and not args.tiny:
        from fact_lightning.models.base import MissingWeightsError

        raise MissingWeightsError("no CLIP model given: pass --clip (a local CLIP folder or hub id)")
    identities = identity_photos(args.identities, args.max_identities)
    prompts = prompts_from_args(args)
    seeds = args.seed or [0]
    sources = sources_from_args(args, "txt2img")
    generator = load_generator(sources)
    scorer = ClipScorer.from_pretrained(args.clip, local_files_only=args.local_files_only) if args.clip else tiny_clip()
    face_model = DlibFaceEmbedder(generator.detector) if args.face_model == "dlib" \
        else TransFaceEmbedder(generator.face_encoder, generator.detector)

    out = Path(args.out)
    per_identity, all_adapter, all_base, all_prompts = {}, [], [], []
    for name, paths in identities.items():
        photos = [read_rgb(p) for p in paths]
        try:
            identity = generator.encode_references(photos)
        except NoFaceError as err:
            log.warning("skipping identity %s: %s", name, err)
            continue
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        adapter_imgs, base_imgs, used_prompts = [], [], []
        for p, prompt in enumerate(prompts):
            for seed in seeds:
                common = dict(negative_prompt=args.negative_prompt or None, guidance_scale=args.guidance_scale,
                              num_inference_steps=args.steps, seed=seed, height=args.height, width=args.width)
                with_adapter = generator(prompt, identity, scale=args.scale, **common)[0]
                without = generator(prompt, identity, scale=0.0, **common)[0]
                with_adapter.save(out / "images" / name / f"p{p:03d}_s{seed}.png")
                without.save(out / "images" / name / f"p{p:03d}_s{seed}_base.png")
                adapter_imgs.append(np.asarray(with_adapter))
                base_imgs.append(np.asarray(without))
                used_prompts.append(prompt)
        scores = {"clip_t": clip_t(scorer, adapter_imgs, used_prompts),
                  "clip_i": float(np.mean([clip_i(scorer, adapter_imgs, [ref] * len(adapter_imgs)) for ref in photos])),
                  "clip_style": clip_i(scorer, adapter_imgs, base_imgs)}
        scores.update(face_similarity(face_model, adapter_imgs, photos))
        per_identity[name] = scores
        all_adapter += adapter_imgs
        all_base += base_imgs
        all_prompts += used_prompts
    if not per_identity:
        raise ValueError("no identity had a usable reference photo")

    clip_t_adapter = clip_t(scorer, all_adapter, all_prompts)
    clip_t_base = clip_t(scorer, all_base, all_prompts)
    face_sims = [s["face_sim"] for s in per_identity.values() if s["face_sim"] is not None]
    metrics = {
        "clip_t": clip_t_adapter,
        "clip_t_base": clip_t_base,
        "clip_t_drop": clip_t_base - clip_t_adapter,
        "clip_i": float(np.mean([s["clip_i"] for s in per_identity.values()])),
        "face_sim": float(np.mean(face_sims)) if face_sims else None,
        "face_detect_rate": float(np.mean([s["face_detect_rate"] for s in per_identity.values()])),
        "clip_style": clip_i(scorer, all_adapter, all_base),
        "fid": fid(all_base, all_adapter, scorer) if len(all_adapter) >= 2 else None,
    }
    report = {
        "metrics": metrics,
        "per_identity": per_identity,
        "counts": {"identities": len(per_identity), "prompts": len(prompts), "seeds": len(seeds),
                   "images": len(all_adapter)},
        "settings": {"sources": sources.to_dict(), "clip": args.clip or "tiny-random", "face_model": args.face_model,
                     "fid_features": "clip-image-embedding", "scale": args.scale, "guidance_scale": args.guidance_scale,
                     "steps": args.steps, "seeds": seeds, "prompts": prompts},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with SummaryWriter(str(out / "tensorboard")) as writer:
        for key, value in metrics.items():
            if value is not None:
                writer.add_scalar(f"eval/{key}", value, 0)
    return report


def main(argv: list[str] | None = None) -> int:
    from fact_lightning.inference.cli import run_guarded

    code, report = run_guarded(run, build_parser().parse_args(argv))
    if code == 0:
        print(json.dumps(report["metrics"], indent=2))
    return code

"""``python -m fact_lightning.evaluation``: generate identities x prompts x seeds and score them like the paper.

Per (identity, prompt, seed) two images share the seed: with the adapter (scale a) and without (scale 0, which
is exactly the base model). Metrics: CLIP-T (adapter images vs prompts), CLIP-T of the base model and the
drop, CLIP-I (vs the identity's reference photos), face similarity, CLIP style (CLIP-I between with/without
adapter) and FID (adapter images vs base images, CLIP features by default: see ``metrics``). Writes
``OUT/metrics.json``, TensorBoard scalars under ``OUT/tensorboard`` and the images under ``OUT/images``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from fact_lightning.checks import count
from fact_lightning.commands.cli_errors import guarded, run_app
from fact_lightning.commands.console import native_noise_filtered, out_console, progress, setup_logging
from fact_lightning.commands.options import (OVERWRITE_HELP, SamplingOptions, WeightOptions, check_numbers, command,
                                             flag, help_text, numeric)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
EVAL = "Evaluation"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)


@dataclasses.dataclass(kw_only=True)
class EvaluateOptions:
    """The identities to evaluate, the scoring models and where the report goes."""

    identities: Annotated[Path, typer.Option(
        metavar="DIR", rich_help_panel=EVAL, help="Folder of <identity>/<photo> reference photos.")]
    out: Annotated[Path, typer.Option(metavar="DIR", rich_help_panel=EVAL, help="Output folder.")]
    overwrite: Annotated[bool, flag("--overwrite", EVAL, OVERWRITE_HELP)] = False
    max_identities: Annotated[Optional[int], numeric(
        count(1), metavar="N", rich_help_panel=EVAL, help="Use the first N identities (sorted).")] = None
    clip: Annotated[Optional[str], typer.Option(
        metavar="DIR|HUB_ID", rich_help_panel=EVAL,
        help="CLIP folder or hub id (e.g. openai/clip-vit-large-patch14); --tiny: random.")] = None
    face_model: Annotated[Literal["transface", "dlib"], typer.Option(
        metavar="NAME", rich_help_panel=EVAL,
        help="Face-similarity model: transface (--face-encoder) or dlib (offline).")] = "transface"
    verbose: Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Debug logging.")] = False

    def __post_init__(self) -> None:
        check_numbers(self)


def identity_photos(root: str | Path, limit: int | None = None) -> dict[str, list[Path]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"identities folder not found: {root}")
    found, others = {}, []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        photos = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
        others += [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if photos:
            found[folder.name] = photos
    if others:  # said, not silently dropped: a photo saved as .heic or .jfif would otherwise just vanish
        kinds = sorted({p.suffix.lower() or "(no extension)" for p in others})
        log.warning("%s: skipped %d file(s) that are not photos by their extension (%s; photos: %s)", root,
                    len(others), ", ".join(kinds), ", ".join(sorted(IMAGE_SUFFIXES)))
    if not found:
        raise ValueError(f"{root} has no <identity>/<photo> folders")
    return dict(list(found.items())[:limit]) if limit else found


def _identity_faces(name: str, paths: list[Path], detector) -> tuple[list, list]:
    """(photos, aligned faces) of the photos fact-data would accept; refused ones are named and skipped."""
    from fact_lightning.faces.reference import NoFaceError, prepare_reference
    from fact_lightning.inference.outputs import read_image

    photos, faces = [], []
    for path in paths:
        try:
            photo = read_image(path, "reference photo")
            faces.append(prepare_reference(photo, detector).face)
            photos.append(photo)
        except (NoFaceError, ValueError, OSError) as err:
            log.warning("identity %s: skipping %s: %s", name, path.name, err)
    return photos, faces


def evaluate(opts: EvaluateOptions, weights: WeightOptions, sampling: SamplingOptions) -> dict:
    """The command's work (also callable from Python). Returns the report written to metrics.json."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from fact_lightning.inference.recipe import DEFAULT_GUIDANCE
    from fact_lightning.inference.loading import load_detector, load_generator, resolved_sources, weight_problems
    from fact_lightning.inference.outputs import OutputFolder
    from fact_lightning.weights import MissingWeightsError, raise_if_missing
    from fact_lightning.tiny import tiny_clip

    from .clip import ClipScorer, clip_i, clip_problem, clip_t
    from .metrics import DlibFaceEmbedder, TransFaceEmbedder, face_similarity, fid

    if not opts.clip and not weights.tiny:
        raise MissingWeightsError("no CLIP model given: pass --clip (a local CLIP folder or hub id)")
    sources = resolved_sources(weights.sources("txt2img"))  # base type settled, the scheduler named
    # Every weight file is checked before anything loads, so one message names all that are missing.
    raise_if_missing([*weight_problems(sources),
                      *filter(None, [opts.clip and clip_problem(opts.clip, local_files_only=weights.local_files_only)])])
    prompts = sampling.prompt_list()
    seeds = sampling.seeds
    output = OutputFolder(opts.out, overwrite=opts.overwrite)
    identities = identity_photos(opts.identities, opts.max_identities)
    with native_noise_filtered():
        detector = load_detector(sources)
        references = {name: _identity_faces(name, paths, detector) for name, paths in identities.items()}
    references = {name: ref for name, ref in references.items() if ref[1]}
    if not references:
        raise ValueError(f"no identity in {opts.identities} has a usable reference photo")
    generator = load_generator(sources, detector)
    scorer = ClipScorer.from_pretrained(opts.clip, local_files_only=weights.local_files_only) if opts.clip \
        else tiny_clip()
    face_model = DlibFaceEmbedder(detector) if opts.face_model == "dlib" \
        else TransFaceEmbedder(generator.face_encoder, detector)
    guidance = DEFAULT_GUIDANCE if sampling.guidance_scale is None else sampling.guidance_scale
    common = {**sampling.generate_kwargs(guidance), "num_images": 1}
    common.pop("adapter_scale")

    per_identity, all_adapter, all_base, all_prompts = {}, [], [], []
    with output, progress() as bar:
        task = bar.add_task("image pairs", total=len(references) * len(prompts) * len(seeds), unit="image pair")
        for name, (photos, faces) in references.items():
            identity = generator.encode_references(faces, aligned=True)
            adapter_imgs, base_imgs, used_prompts = [], [], []
            for p, prompt in enumerate(prompts):
                for seed in seeds:
                    with_adapter = generator(prompt, identity, adapter_scale=sampling.scale_for("txt2img"), seed=seed,
                                             **common)[0]
                    without = generator(prompt, identity, adapter_scale=0.0, seed=seed, **common)[0]
                    with_adapter.save(output.path(f"images/{name}/p{p:03d}_s{seed}.png"))
                    without.save(output.path(f"images/{name}/p{p:03d}_s{seed}_base.png"))
                    adapter_imgs.append(np.asarray(with_adapter))
                    base_imgs.append(np.asarray(without))
                    used_prompts.append(prompt)
                    bar.advance(task)
            scores = {"clip_t": clip_t(scorer, adapter_imgs, used_prompts),
                      "clip_i": float(np.mean([clip_i(scorer, adapter_imgs, [ref] * len(adapter_imgs))
                                               for ref in photos])),
                      "clip_style": clip_i(scorer, adapter_imgs, base_imgs)}
            scores.update(face_similarity(face_model, adapter_imgs, photos))
            per_identity[name] = scores
            all_adapter += adapter_imgs
            all_base += base_imgs
            all_prompts += used_prompts

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
            "settings": {"sources": sources.to_dict(), "clip": opts.clip or "tiny-random",
                         "face_model": opts.face_model, "fid_features": "clip-image-embedding",
                         "adapter_scale": sampling.scale_for("txt2img"), "guidance_scale": guidance,
                         "negative_prompt": sampling.negative_prompt,
                         "text_only_guidance": sampling.text_only_guidance, "face_delay": sampling.face_delay,
                         "steps": sampling.steps, "seeds": seeds, "prompts": prompts},
        }
        output.write_json("metrics.json", report)
        with SummaryWriter(str(output.folder("tensorboard"))) as writer:
            for key, value in metrics.items():
                if value is not None:
                    writer.add_scalar(f"eval/{key}", value, 0)
    return report


HELP = help_text("""
    Score a FACT adapter like the paper: identities x prompts x seeds, each with the adapter and
    without it (adapter scale 0, same seed).

    Writes OUT/metrics.json (CLIP-T, CLIP-T of the base model and the drop, CLIP-I, face similarity
    with the detection rate, CLIP style, FID on CLIP features), TensorBoard scalars under
    OUT/tensorboard and the images under OUT/images. Sampling defaults are the official FACT app's.
""")


@app.command(help=HELP)
@guarded
@command
def evaluate_command(opts: EvaluateOptions, weights: WeightOptions, sampling: SamplingOptions) -> None:
    import json

    setup_logging(opts.verbose, tiny=weights.tiny)
    report = evaluate(opts, weights, sampling)
    out_console.print_json(json.dumps(report["metrics"]))


def main(argv: list[str] | None = None) -> int:
    """Console script: runs the command and returns its exit status (2 for a user error)."""
    return run_app(app, argv)

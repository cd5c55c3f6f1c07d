"""``python -m fact_lightning.inference``: portraits of the person in the reference photo(s).

Writes ``OUT/images/*.png``, ``OUT/references/*.png`` (the aligned, head-masked faces the encoder saw) and
``OUT/settings.json`` (every setting and, per image, its prompt and seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .generator import DEFAULT_GUIDANCE, DEFAULT_SCALE, DEFAULT_STEPS
from .pipelines import SCHEDULERS

log = logging.getLogger(__name__)


def _lora(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if sep and path and weight.replace(".", "", 1).isdigit():
        return path, float(weight)
    return text, 1.0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments naming the weights; shared with the evaluation command."""
    g = parser.add_argument_group("weights")
    g.add_argument("--base", help="SD1.5-style diffusers folder or hub id (an inpainting model with --template)")
    g.add_argument("--adapter", help="FACT adapter: our .safetensors export or the official FACT torch file")
    g.add_argument("--face-encoder", help="official TransFace weights, e.g. ms1mv2_model_TransFace_S.pt")
    g.add_argument("--face-encoder-variant", default="S", help="TransFace variant of --face-encoder (default S)")
    g.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:WEIGHT]",
                   help="LoRA file or folder (diffusers/kohya safetensors); repeatable")
    g.add_argument("--controlnet", help="ControlNet folder or hub id (e.g. an SD1.5 OpenPose ControlNet); 'tiny' with --tiny")
    g.add_argument("--scheduler", default="ddim", choices=SCHEDULERS)
    g.add_argument("--detector", default="mediapipe", choices=("mediapipe", "facexlib"))
    g.add_argument("--detector-weights", help="facexlib weights folder")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--local-files-only", action="store_true", help="never contact the hub")
    g.add_argument("--tiny", action="store_true", help="seeded random CPU components (tests, demos); no weights needed")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--prompts", help="prompt file: one per line, '#' comments, {subject} placeholder")
    g.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    g.add_argument("--subject", default="a person", help="replaces {subject} in prompts")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", action="append", type=int, default=[], help="repeatable; default 0")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt and seed")
    g.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="adapter scale a (official 0.5)")
    g.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                   help="diffusers' g = 1 + w of Eq. 5 (official app 5.0; the paper's 'CFG 7.0' is 7.0)")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fact_lightning.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="append", required=True, help="photo of the person; repeatable (16 tokens each)")
    parser.add_argument("--aligned-reference", action="store_true", help="references are already aligned 112x112 faces")
    parser.add_argument("--out", required=True, help="output folder")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    g = parser.add_argument_group("inpainting (the inpainting portrait mode)")
    g.add_argument("--template", help="template photo whose face region is regenerated")
    g.add_argument("--mask", help="mask image (white = regenerate); default: the template's detected face region")
    g.add_argument("--mask-dilate", type=float, default=0.1, help="grow the detected mask by this fraction of the face size")
    g.add_argument("--head-mask", action="store_true", help="regenerate the head region, not only the face")
    g = parser.add_argument_group("ControlNet")
    g.add_argument("--control-image", help="conditioning image (e.g. an OpenPose skeleton)")
    g.add_argument("--controlnet-scale", type=float, default=1.0)
    return parser


def sources_from_args(args: argparse.Namespace, mode: str):
    from .loading import GeneratorSources

    return GeneratorSources(base=args.base, adapter=args.adapter, face_encoder=args.face_encoder,
                            face_encoder_variant=args.face_encoder_variant, mode=mode, controlnet=args.controlnet,
                            loras=args.lora, scheduler=args.scheduler, detector=args.detector,
                            detector_weights=args.detector_weights, device=args.device, dtype=args.dtype,
                            local_files_only=args.local_files_only, tiny=args.tiny)


def prompts_from_args(args: argparse.Namespace) -> list[str]:
    from .prompts import read_prompts

    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts, args.subject)
    if not prompts:
        raise ValueError("give prompts with --prompts FILE or --prompt TEXT")
    return [p.replace("{subject}", args.subject) for p in prompts]


def read_rgb(path: str | Path):
    from fact_lightning.faces.decode import decode_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    decoded = decode_image(path.read_bytes())
    if decoded.image is None:
        raise ValueError(f"cannot read {path}: {decoded.reason} {decoded.detail}")
    return decoded.image


def run(args: argparse.Namespace) -> dict:
    from PIL import Image

    from .loading import load_generator

    mode = "inpaint" if args.template else "controlnet" if args.controlnet else "txt2img"
    sources = sources_from_args(args, mode)
    prompts = prompts_from_args(args)
    seeds = args.seed or [0]
    references = [read_rgb(p) for p in args.reference]
    generator = load_generator(sources)
    identity = generator.encode_references(references, aligned=args.aligned_reference)

    extra = {}
    if mode == "inpaint":
        from fact_lightning.faces.reference import face_region_mask

        template = read_rgb(args.template)
        mask = read_rgb(args.mask)[..., 0] if args.mask else \
            face_region_mask(template, generator.detector, dilate=args.mask_dilate, head=args.head_mask)
        extra = dict(image=Image.fromarray(template), mask_image=Image.fromarray(mask))
    elif mode == "controlnet":
        if not args.control_image:
            raise ValueError("--controlnet needs --control-image")
        extra = dict(control_image=Image.fromarray(read_rgb(args.control_image)),
                     controlnet_conditioning_scale=args.controlnet_scale)

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "references").mkdir(exist_ok=True)
    if not args.aligned_reference:
        from fact_lightning.faces.reference import prepare_reference

        for i, photo in enumerate(references):
            Image.fromarray(prepare_reference(photo, generator.detector).face).save(out / "references" / f"ref_{i:02d}.png")
    if mode == "inpaint":
        extra["mask_image"].save(out / "mask.png")

    entries = []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            images = generator(prompt, identity, negative_prompt=args.negative_prompt or None, scale=args.scale,
                               guidance_scale=args.guidance_scale, num_inference_steps=args.steps, seed=seed,
                               num_images=args.num_images, height=args.height, width=args.width, **extra)
            for k, image in enumerate(images):
                name = f"images/p{p:03d}_s{seed}_{k}.png"
                image.save(out / name)
                entries.append({"file": name, "prompt": prompt, "seed": seed, "index": k})
                log.info("wrote %s", out / name)

    settings = {
        "mode": mode, "sources": sources.to_dict(), "references": [str(p) for p in args.reference],
        "aligned_reference": args.aligned_reference, "negative_prompt": args.negative_prompt,
        "scale": args.scale, "guidance_scale": args.guidance_scale, "steps": args.steps, "seeds": seeds,
        "num_images": args.num_images, "height": args.height, "width": args.width, "template": args.template,
        "mask": args.mask, "control_image": args.control_image, "controlnet_scale": args.controlnet_scale,
        "images": entries, "out": str(out),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    return settings


def run_guarded(run, args: argparse.Namespace) -> tuple[int, object]:
    """Runs a command; a missing file or weight, or a bad input, is one clear line and exit code 2."""
    from fact_lightning.faces.reference import NoFaceError
    from fact_lightning.models.base import MissingWeightsError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return 0, run(args)
    except (MissingWeightsError, FileNotFoundError, NoFaceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None


def main(argv: list[str] | None = None) -> int:
    code, settings = run_guarded(run, build_parser().parse_args(argv))
    if code == 0:
        print(f"{len(settings['images'])} images and settings.json written to {settings['out']}")
    return code

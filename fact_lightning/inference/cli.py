"""``fact-generate`` (``python -m fact_lightning.inference``): portraits of the person in the reference photos.

Writes ``OUT/images/*.png``, ``OUT/references/*.png`` (the aligned, head-masked faces the encoder saw) and
``OUT/settings.json`` (every setting and, per image, its prompt and seed). Every input is checked (output
folder writable and free, photos readable, a face fact-data would accept in each reference) before a model
loads; the folder is assembled aside and put in place whole (``OutputFolder``), so a failed or stopped run
leaves no partial output and earlier results are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from fact_lightning.checks import number
from fact_lightning.commands.cli_errors import guarded, run_app
from fact_lightning.commands.console import native_noise_filtered, out_console, progress, setup_logging
from fact_lightning.commands.options import (OVERWRITE_HELP, WEIGHTS, SamplingOptions, WeightOptions, check_numbers,
                                             command, flag, help_text, numeric)
from fact_lightning.inference.recipe import INPAINT_ADAPTER_SCALE, INPAINT_GUIDANCE

REFERENCE, INPAINT, CONTROL = "Reference photos and output", "Inpainting portrait mode", "ControlNet"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)


@dataclasses.dataclass(kw_only=True)
class GenerateOptions:
    """What to generate from and where to write; the inpainting and ControlNet modes' inputs."""

    reference: Annotated[list[Path], typer.Option(
        metavar="PHOTO", rich_help_panel=REFERENCE,
        help="Photo of the person; repeatable (16 identity tokens each).")]
    out: Annotated[Path, typer.Option(metavar="DIR", rich_help_panel=REFERENCE, help="Output folder.")]
    overwrite: Annotated[bool, flag("--overwrite", REFERENCE, OVERWRITE_HELP)] = False
    aligned_reference: Annotated[bool, flag(
        "--aligned-reference", REFERENCE, "The references are aligned 112x112 faces already.")] = False
    any_face: Annotated[bool, flag(
        "--any-face", REFERENCE, "Take the largest face even where fact-data refuses the photo (several "
        "faces, a face cut by the border, a small face).")] = False
    template: Annotated[Optional[Path], typer.Option(
        metavar="PHOTO", rich_help_panel=INPAINT,
        help="Template photo whose face region is regenerated (needs an inpainting --base).")] = None
    mask: Annotated[Optional[Path], typer.Option(
        metavar="IMAGE", rich_help_panel=INPAINT,
        help="Mask (white = regenerate); default: the template's detected face.")] = None
    mask_dilate: Annotated[float, numeric(
        number(0.0, 10.0), metavar="FRACTION", rich_help_panel=INPAINT,
        help="Grow the detected mask by this fraction of the face size.")] = 0.1
    head_mask: Annotated[bool, flag("--head-mask", INPAINT, "Regenerate the head region, not only the face.")] = False
    strength: Annotated[Optional[float], numeric(
        number(above=0.0, max=1.0), metavar="FLOAT", rich_help_panel=INPAINT, show_default=False,
        help="How far the face region is re-noised (1.0: from noise; strength x steps are run); default 0.6, "
             "the official inpainting app's.")] = None
    control_image: Annotated[Optional[Path], typer.Option(
        metavar="IMAGE", rich_help_panel=CONTROL,
        help="Conditioning image of --controlnet (e.g. an OpenPose skeleton).")] = None
    controlnet_scale: Annotated[float, numeric(
        number(0.0, 10.0), metavar="FLOAT", rich_help_panel=CONTROL, help="ControlNet conditioning scale.")] = 1.0
    base_config: Annotated[Optional[Path], typer.Option(
        metavar="DIR", rich_help_panel=WEIGHTS,
        help="With a single-file --base: a folder of diffusers configs (unet/, vae/, text_encoder/, scheduler/) "
             "that describe it; default: SD1.5's, shipped with fact-lightning.")] = None
    verbose: Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Debug logging.")] = False

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.mask is not None and self.template is None:
            raise ValueError("--mask needs --template (the inpainting portrait mode)")
        if self.strength is not None and self.template is None:
            raise ValueError("--strength needs --template (the inpainting portrait mode)")


def _mode(opts: GenerateOptions, weights: WeightOptions) -> str:
    if opts.template is not None:
        if weights.controlnet:
            raise ValueError("--template (inpainting) and --controlnet cannot be combined")
        return "inpaint"
    if weights.controlnet:
        if opts.control_image is None:
            raise ValueError("--controlnet needs --control-image")
        return "controlnet"
    if opts.control_image is not None:
        raise ValueError("--control-image needs --controlnet")
    return "txt2img"


def _reference_faces(opts: GenerateOptions, photos: list, detector) -> list:
    """The aligned, head-masked face of each reference photo, refused for fact-data's named reasons."""
    import numpy as np

    from fact_lightning.faces.reference import LENIENT_POLICY, FacePolicy, NoFaceError, prepare_reference

    if opts.aligned_reference:
        for path, face in zip(opts.reference, photos):
            if face.shape != (112, 112, 3):
                raise ValueError(f"reference photo {path} is {face.shape[1]}x{face.shape[0]}, "
                                 "not an aligned 112x112 face (--aligned-reference)")
        return [np.asarray(face, np.uint8) for face in photos]
    policy = LENIENT_POLICY if opts.any_face else FacePolicy()
    faces = []
    for path, photo in zip(opts.reference, photos):
        try:
            faces.append(prepare_reference(photo, detector, policy).face)
        except NoFaceError as err:
            hint = "" if opts.any_face or err.reason == "no_face" else "; --any-face takes the largest face anyway"
            raise NoFaceError(f"reference photo {path}: {err}{hint}", err.reason) from None
    return faces


def generate(opts: GenerateOptions, weights: WeightOptions, sampling: SamplingOptions) -> dict:
    """The command's work (also callable from Python). Returns the settings written to settings.json."""
    from PIL import Image

    from fact_lightning.faces.reference import NoFaceError, face_region_mask
    from fact_lightning.inference.recipe import recipe_defaults
    from fact_lightning.inference.loading import load_detector, load_generator, resolved_sources
    from fact_lightning.inference.outputs import OutputFolder, read_image

    mode = _mode(opts, weights)
    sources = weights.sources(mode)
    if opts.base_config is not None:
        sources = dataclasses.replace(sources, base_config=str(opts.base_config))
    prompts = sampling.prompt_list()
    output = OutputFolder(opts.out, overwrite=opts.overwrite)
    photos = [read_image(path, "reference photo") for path in opts.reference]
    template = read_image(opts.template, "template photo") if opts.template else None
    mask = read_image(opts.mask, "mask image")[..., 0] if opts.mask else None
    control = read_image(opts.control_image, "control image") if opts.control_image else None
    # SD1.5 or SDXL, from the adapter file and --base alone (a mismatch stops here), and the base's own sampler.
    sources = resolved_sources(sources)

    with native_noise_filtered():
        detector = load_detector(sources)
        faces = _reference_faces(opts, photos, detector)
        if template is not None and mask is None:
            try:
                mask = face_region_mask(template, detector, dilate=opts.mask_dilate, head=opts.head_mask)
            except NoFaceError as err:
                raise NoFaceError(f"template photo {opts.template}: {err}; give its --mask", err.reason) from None
    generator = load_generator(sources, detector)
    identity = generator.encode_references(faces, aligned=True)
    # The official app's settings for this mode, resolved here so that settings.json records what was used.
    recipe = recipe_defaults(mode == "inpaint")
    guidance = recipe["guidance_scale"] if sampling.guidance_scale is None else sampling.guidance_scale
    strength = recipe["strength"] if opts.strength is None else opts.strength
    call = sampling.generate_kwargs(guidance, mode)
    extra = {}
    if mode == "inpaint":
        extra = dict(image=Image.fromarray(template), mask_image=Image.fromarray(mask), strength=strength)
    elif mode == "controlnet":
        extra = dict(control_image=Image.fromarray(control), controlnet_conditioning_scale=opts.controlnet_scale)

    entries = []
    with output, progress() as bar:
        if not opts.aligned_reference:
            for i, face in enumerate(faces):
                Image.fromarray(face).save(output.path(f"references/ref_{i:02d}.png"))
        if mode == "inpaint":
            extra["mask_image"].save(output.path("mask.png"))
        task = bar.add_task("images", total=len(prompts) * len(sampling.seeds) * sampling.num_images,
                            unit="image")
        for p, prompt in enumerate(prompts):
            for seed in sampling.seeds:
                images = generator(prompt, identity, seed=seed, num_images=sampling.num_images, **call, **extra)
                for k, image in enumerate(images):
                    name = f"images/p{p:03d}_s{seed}_{k}.png"
                    image.save(output.path(name))
                    entries.append({"file": name, "prompt": prompt, "seed": seed, "index": k})
                    bar.advance(task)
        settings = {
            "mode": mode, "base_type": sources.base_type, "sources": sources.to_dict(),
            "references": [str(p) for p in opts.reference],
            "aligned_reference": opts.aligned_reference, "any_face": opts.any_face,
            "negative_prompt": sampling.negative_prompt, "adapter_scale": call["adapter_scale"],
            "guidance_scale": guidance, "strength": strength, "text_only_guidance": sampling.text_only_guidance,
            "face_delay": sampling.face_delay, "steps": sampling.steps, "seeds": sampling.seeds,
            "num_images": sampling.num_images, "height": sampling.height, "width": sampling.width,
            "template": None if opts.template is None else str(opts.template),
            "mask": None if opts.mask is None else str(opts.mask),
            "control_image": None if opts.control_image is None else str(opts.control_image),
            "controlnet_scale": opts.controlnet_scale, "images": entries, "out": str(opts.out),
        }
        output.write_json("settings.json", settings)
    return settings


HELP = help_text("""
    Portraits of the person in the reference photos: a FACT adapter on SD1.5 or SDXL (the adapter file
    says which).

    Writes OUT/images/*.png, OUT/references/*.png (the aligned faces the encoder saw) and
    OUT/settings.json. Defaults are the official FACT apps': PNDM (on SDXL: its own Euler), 50 steps,
    guidance 7.0 and adapter scale 0.5 (inpainting: guidance 5.0, adapter scale 0.55, strength 0.6, one
    pass), guidance over text and face at once (Eq. 5).
""")


# What holds in fact-generate alone: the inpainting portrait mode's defaults (the official inpainting app's).
INPAINT_NOTES = {
    "base": "An inpainting model with --template. A single .safetensors file (the original SD layout, as "
            "community fine-tunes ship) loads offline with --base-config's configs, by default SD1.5's or SDXL "
            "base 1.0's (by the file's keys).",
    "adapter_scale": f"With --template: {INPAINT_ADAPTER_SCALE}, the official inpainting app's.",
    "guidance_scale": f"With --template: default {INPAINT_GUIDANCE}.",
}


@app.command(help=HELP)
@guarded
@command(notes=INPAINT_NOTES)
def generate_command(opts: GenerateOptions, weights: WeightOptions, sampling: SamplingOptions) -> None:
    setup_logging(opts.verbose, tiny=weights.tiny)
    settings = generate(opts, weights, sampling)
    out_console.print(f"{len(settings['images'])} images and settings.json written to {settings['out']}")


def main(argv: list[str] | None = None) -> int:
    """Console script: runs the command and returns its exit status (2 for a user error)."""
    return run_app(app, argv)

"""The options that ``fact-generate`` and ``fact-evaluate`` share, each declared once with its help.

Options are typed dataclass fields whose ``Annotated`` metadata is their ``typer.Option``; a command takes
whole dataclasses as parameters and :func:`command` spreads their fields into the signature Typer reads,
then rebuilds the dataclasses (which validate themselves) for the command body. So a command is a plain
function of typed objects, as litgpt's ``args.py`` does for its entry points.

Every number goes through a :class:`~fact_lightning.checks.Range` (:func:`numeric`): the parser refuses a
non-finite or out-of-range value naming the option, and :func:`check_numbers` applies the same ranges to a
dataclass built from Python. :func:`command` refuses to build a command with an int or float option that
has no range, so no new option can skip the check.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from fact_lightning.checks import FRACTION, PIXELS, SEED, Range, check_template, count, number
from fact_lightning.inference.prompts import PLACEHOLDERS
from fact_lightning.base_types import BASE_TYPES
from fact_lightning.inference.recipe import (DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_STEPS,
                                             INFERENCE_ADAPTER_SCALE, INPAINT_ADAPTER_SCALE, SCHEDULERS)

WEIGHTS, SAMPLING = "Weights", "Sampling"
ADAPTER_SCALE = number(0.0, 10.0)


def numeric(range_: Range, *decls: str, **option):
    """A number option: ``typer.Option(*decls, parser=range_, ...)``, its range declared once, with the option."""
    return typer.Option(*decls, parser=range_, **option)


def _leaf_type(annotation):
    """int for ``int``, ``Optional[int]`` and ``list[int]`` alike."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _leaf_type(args[0]) if len(args) == 1 else annotation


def _option_info(annotation):
    return next((m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None)


def option_range(annotation) -> Range | None:
    """The Range an ``Annotated[..., typer.Option(parser=Range)]`` field parses through, if any."""
    info = _option_info(annotation)
    return info.parser if info is not None and isinstance(info.parser, Range) else None


def check_numbers(obj) -> None:
    """Applies each numeric field's Range to its value (each value of a list): ValueError naming the option."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        range_ = option_range(hints[f.name])
        value = getattr(obj, f.name)
        if range_ is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            range_.check(item, "--" + f.name.replace("_", "-"))


def command(fn=None, *, notes: dict[str, str] | None = None):
    """Lets Typer read ``fn(opts: SomeOptions, ...)``: each dataclass parameter becomes its fields' options.

    ``notes``: a sentence added to an option's help in this command only (``@command(notes={field: text})``),
    for what holds in one command alone, such as fact-generate's inpainting defaults.
    """
    if fn is None:
        return functools.partial(command, notes=notes)
    notes = dict(notes or {})
    hints = typing.get_type_hints(fn)
    groups = {name: cls for name, cls in hints.items() if name != "return" and dataclasses.is_dataclass(cls)}
    params, owner = [], {}
    for group, cls in groups.items():
        field_hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise TypeError(f"option {f.name!r} is declared by both {owner[f.name]} and {cls.__name__}")
            if _leaf_type(typing.get_args(field_hints[f.name])[0]) in (int, float) and \
                    option_range(field_hints[f.name]) is None:
                raise TypeError(f"numeric option {f.name!r} of {cls.__name__} has no range: declare it with numeric()")
            owner[f.name] = cls.__name__
            default = f.default if f.default is not dataclasses.MISSING else \
                f.default_factory() if f.default_factory is not dataclasses.MISSING else inspect.Parameter.empty
            annotation = field_hints[f.name]
            if f.name in notes:
                annotation = _with_note(annotation, notes.pop(f.name))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    if notes:
        raise TypeError(f"notes for options {sorted(notes)} that {fn.__name__} does not have")

    @functools.wraps(fn)
    def wrapper(**values):
        return fn(**{group: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
                     for group, cls in groups.items()})

    del wrapper.__wrapped__  # Typer must read the spread signature, not fn's
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _with_note(annotation, note: str):
    """``Annotated[T, typer.Option(help=h)]`` as ``Annotated[T, typer.Option(help=h + note)]`` (a copy)."""
    info = _option_info(annotation)
    noted = copy.copy(info)
    noted.help = f"{info.help} {note}" if info.help else note
    base, *metadata = typing.get_args(annotation)
    return Annotated[(base, *(noted if m is info else m for m in metadata))]


def help_text(doc: str) -> str:
    """A docstring as command help: each paragraph on one line, so that the terminal, not the source, wraps it."""
    return "\n\n".join(" ".join(par.split()) for par in inspect.cleandoc(doc).split("\n\n"))


def flag(name: str, panel: str | None, help: str):
    """A boolean ``--name`` option (no ``--no-name``, no type shown)."""
    return typer.Option(name, metavar="", rich_help_panel=panel, help=help)


def _choices(values) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


LORA_WEIGHT = number(-10.0, 10.0)
OVERWRITE_HELP = ("Replace a non-empty --out. The old folder stays whole until the new one is complete, "
                  "then the two are swapped.")


def _lora(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep and path else None
    except ValueError:  # no weight: the colon belongs to the path
        value = None
    if value is None:
        return text, 1.0
    return path, LORA_WEIGHT.check(value, f"--lora {text}: the weight")


@dataclasses.dataclass(kw_only=True)
class WeightOptions:
    """Where every model comes from (``--tiny``: seeded random CPU stand-ins, nothing to download)."""

    base: Annotated[Optional[str], typer.Option(
        metavar="DIR|HUB_ID|FILE", rich_help_panel=WEIGHTS,
        help="SD1.5 or SDXL diffusers folder or hub id, or a single SD1.5 or SDXL .safetensors file.")] = None
    base_type: Annotated[Optional[Literal[BASE_TYPES]], typer.Option(
        metavar="sd15|sdxl", rich_help_panel=WEIGHTS, show_default=False,
        help="The base model's type; default: what the --adapter file records, else what --base holds, else "
             "sd15. With --tiny: the random stand-in to build.")] = None
    adapter: Annotated[Optional[Path], typer.Option(
        metavar="FILE", rich_help_panel=WEIGHTS,
        help="FACT adapter: our .safetensors export or the official FACT torch file.")] = None
    face_encoder: Annotated[Optional[Path], typer.Option(
        metavar="FILE", rich_help_panel=WEIGHTS,
        help="Official TransFace weights, e.g. ms1mv2_model_TransFace_S.pt.")] = None
    face_encoder_variant: Annotated[Literal["S", "B", "L"], typer.Option(
        metavar="S|B|L", rich_help_panel=WEIGHTS, help="TransFace variant of --face-encoder.")] = "S"
    lora: Annotated[list[str], typer.Option(
        metavar="PATH[:WEIGHT]", rich_help_panel=WEIGHTS,
        help="LoRA file, folder or hub id (diffusers/kohya safetensors); repeatable.")] = \
        dataclasses.field(default_factory=list)
    controlnet: Annotated[Optional[str], typer.Option(
        metavar="DIR|HUB_ID", rich_help_panel=WEIGHTS,
        help="ControlNet folder or hub id (e.g. SD1.5 OpenPose); 'tiny' with --tiny.")] = None
    scheduler: Annotated[Optional[Literal[SCHEDULERS]], typer.Option(
        metavar="NAME", rich_help_panel=WEIGHTS, show_default=False,
        help=f"Sampler: {_choices(SCHEDULERS)}; default: the base's own: PNDM for SD1.5 (the official apps'), "
             "Euler for SDXL.")] = None
    detector: Annotated[Literal["mediapipe", "facexlib"], typer.Option(
        metavar="NAME", rich_help_panel=WEIGHTS,
        help="Face detector: mediapipe (offline) or facexlib.")] = "mediapipe"
    detector_weights: Annotated[Optional[Path], typer.Option(
        metavar="DIR", rich_help_panel=WEIGHTS, help="facexlib weights folder.")] = None
    device: Annotated[str, typer.Option(
        metavar="DEVICE", rich_help_panel=WEIGHTS, help="cpu, cuda, cuda:1, ...")] = "cpu"
    dtype: Annotated[Literal["float32", "float16", "bfloat16"], typer.Option(
        metavar="DTYPE", rich_help_panel=WEIGHTS,
        help="Precision of the diffusion models: float32, float16 or bfloat16.")] = "float32"
    local_files_only: Annotated[bool, flag("--local-files-only", WEIGHTS, "Never contact the hub.")] = False
    tiny: Annotated[bool, flag("--tiny", WEIGHTS,
                               "Seeded RANDOM CPU models, no weights needed (tests, demos).")] = False

    @property
    def loras(self) -> list[tuple[str, float]]:
        return [_lora(text) for text in self.lora]

    def sources(self, mode: str):
        """The ``GeneratorSources`` these options name, for ``mode`` (txt2img, inpaint, controlnet)."""
        from fact_lightning.inference.loading import GeneratorSources

        return GeneratorSources(
            base=self.base, adapter=None if self.adapter is None else str(self.adapter),
            face_encoder=None if self.face_encoder is None else str(self.face_encoder),
            face_encoder_variant=self.face_encoder_variant, mode=mode, controlnet=self.controlnet,
            loras=self.loras, scheduler=self.scheduler, detector=self.detector,
            detector_weights=None if self.detector_weights is None else str(self.detector_weights),
            device=self.device, dtype=self.dtype, local_files_only=self.local_files_only, tiny=self.tiny,
            base_type=self.base_type)


@dataclasses.dataclass(kw_only=True)
class SamplingOptions:
    """Prompts, seeds and the sampler's settings; defaults are the official FACT app's."""

    prompts: Annotated[Optional[Path], typer.Option(
        metavar="FILE", rich_help_panel=SAMPLING,
        help="Prompt file: one per line, '#' comments, {subject} placeholder.")] = None
    prompt: Annotated[list[str], typer.Option(
        metavar="TEXT", rich_help_panel=SAMPLING, help="A prompt; repeatable.")] = dataclasses.field(default_factory=list)
    subject: Annotated[str, typer.Option(
        metavar="TEXT", rich_help_panel=SAMPLING, help="Replaces {subject} in the prompts.")] = "a person"
    negative_prompt: Annotated[str, typer.Option(
        metavar="TEXT", rich_help_panel=SAMPLING,
        help="Negative prompt ('' for none). The default is the official FaceAdapter_v1.generate's fallback; "
             "the official text-to-image app passes '' and its web app a list of its own.")] = DEFAULT_NEGATIVE_PROMPT
    seed: Annotated[list[int], numeric(
        SEED, metavar="INT", rich_help_panel=SAMPLING, help="Repeatable; default 0.")] = \
        dataclasses.field(default_factory=list)
    num_images: Annotated[int, numeric(
        count(1, 10_000), metavar="INT", rich_help_panel=SAMPLING, help="Images per prompt and seed.")] = 1
    adapter_scale: Annotated[Optional[float], numeric(
        ADAPTER_SCALE, metavar="FLOAT", rich_help_panel=SAMPLING, show_default=False,
        help=f"Adapter scale a of Eq. 2 (0: the base model); default {INFERENCE_ADAPTER_SCALE}, the official "
             "app's.")] = None
    # the old name of --adapter-scale
    scale: Annotated[Optional[float], numeric(ADAPTER_SCALE, "--scale", hidden=True)] = None
    guidance_scale: Annotated[Optional[float], numeric(
        number(0.0, 100.0), metavar="FLOAT", rich_help_panel=SAMPLING, show_default=False,
        help=f"diffusers' guidance_scale; the paper's 'CFG 7.0' is passed as 7.0, as the official code "
             f"does (default {DEFAULT_GUIDANCE}).")] = None
    text_only_guidance: Annotated[bool, flag(
        "--text-only-guidance", SAMPLING,
        "Both guidance branches carry the face (official cfg_face=False); by default the negative "
        "branch has the id-drop embedding (Eq. 5).")] = False
    face_delay: Annotated[float, numeric(
        FRACTION, metavar="FRACTION", rich_help_panel=SAMPLING,
        help="The adapter acts only after this fraction of the steps (0: all, 1: none); our "
             "implementation of the official delayed_face_condition.")] = 0.0
    steps: Annotated[int, numeric(
        count(1, 1000), metavar="INT", rich_help_panel=SAMPLING, help="Denoising steps.")] = DEFAULT_STEPS
    height: Annotated[Optional[int], numeric(
        PIXELS, metavar="PX", rich_help_panel=SAMPLING,
        help="Image height (default: the model's, 512 for SD1.5, 1024 for SDXL).")] = None
    width: Annotated[Optional[int], numeric(
        PIXELS, metavar="PX", rich_help_panel=SAMPLING, help="Image width (default: the model's).")] = None

    def __post_init__(self) -> None:
        check_numbers(self)
        if self.scale is not None:
            if self.adapter_scale not in (None, self.scale):
                raise ValueError("give --adapter-scale only (--scale is its old name)")
            self.adapter_scale, self.scale = self.scale, None
        for text in self.prompt:
            check_template(text, PLACEHOLDERS, "--prompt")
        if self.prompts is None and not self.prompt:
            raise ValueError("give prompts with --prompts FILE or --prompt TEXT")
        if self.prompts is not None and not self.prompts.is_file():
            what = "is a directory, not a file" if self.prompts.is_dir() else "not found"
            raise FileNotFoundError(f"prompt file {what}: {self.prompts}")

    @property
    def seeds(self) -> list[int]:
        return list(self.seed) or [0]

    def prompt_list(self) -> list[str]:
        """``--prompt`` values, then the ``--prompts`` file's, with ``{subject}`` replaced."""
        from fact_lightning.inference.prompts import fill, read_prompts

        return [fill(p, self.subject) for p in self.prompt] + (read_prompts(self.prompts, self.subject)
                                                                if self.prompts else [])

    def scale_for(self, mode: str) -> float:
        """``--adapter-scale``, or the official app's for ``mode`` (txt2img, inpaint, controlnet)."""
        if self.adapter_scale is not None:
            return self.adapter_scale
        return INPAINT_ADAPTER_SCALE if mode == "inpaint" else INFERENCE_ADAPTER_SCALE

    def generate_kwargs(self, guidance_scale: float, mode: str = "txt2img") -> dict:
        """Keyword arguments of ``FacePortraitGenerator.__call__`` (seed, prompt and images per call aside)."""
        return dict(negative_prompt=self.negative_prompt or None, adapter_scale=self.scale_for(mode),
                    guidance_scale=guidance_scale, num_inference_steps=self.steps, height=self.height,
                    width=self.width, text_only_guidance=self.text_only_guidance, face_delay=self.face_delay)

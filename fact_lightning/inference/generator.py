"""Portraits from reference photos: a FACT adapter on a diffusers pipeline's UNet, sampled as the official
release samples.

Guidance is the paper's Eq. 5 over both conditions at once, ``(1 + w) * H(text, e_id) - w * H(negative,
Prj(zeros))``. diffusers computes ``uncond + g * (cond - uncond)`` on the batch ``[uncond, cond]``; we pass
the identity embeddings in the same order, ``[Prj(zeros), e_id]``, so the unconditional branch carries the
negative prompt *and* the id-drop embedding. The paper's "CFG scale 7.0" is passed as ``guidance_scale=7.0``,
as the official code passes it (facechain ``inference_fact.py``). An inpainting pipeline gets the inpainting
stage of the official ``inference_inpaint_fact.py`` instead: guidance 5.0, adapter scale 0.55, strength 0.6
(one pass; that app's ControlNets, refinement passes and face fusion are not part of this generator).
``text_only_guidance=True`` is the official ``cfg_face=False``: both branches carry e_id, so guidance
pushes along the text only. ``face_delay`` is our implementation of the official ``delayed_face_condition``
(see ``FacePortraitGenerator.__call__``).

SDXL runs the same way through diffusers' SDXL pipelines (:mod:`.pipelines`), whose guidance batch is also
``[uncond, cond]``: the unconditional branch gets the negative prompt through both text encoders (its token
states and its pooled embedding; a missing negative prompt is the encoded "", not stock SDXL's zeros) and
Prj(zeros). Its micro-conditioning (``original_size``, ``crops_coords_top_left``, ``target_size``) is the
pipeline's default, the generated size and (0, 0), for both branches unless given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fact_lightning.models.injection import FaceAdapter

from .bases import SD15, SDXL
from .pipelines import build_pipeline, load_lora
from .recipe import DEFAULT_NEGATIVE_PROMPT, DEFAULT_STEPS, recipe_defaults

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class IdentityCondition:
    """Face-encoder tokens of one person's reference photos: (P, T, D), P photos of T tokens."""

    tokens: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or len(self.tokens) == 0:
            raise ValueError(f"expected face tokens (P>=1, T, D), got shape {tuple(self.tokens.shape)}")

    @property
    def num_photos(self) -> int:
        return len(self.tokens)


class FacePortraitGenerator:
    """A diffusers pipeline plus a FACT adapter attached to its UNet, and the reference-photo encoder.

    ``pipeline``: StableDiffusion{,Inpaint,ControlNet}Pipeline or its SDXL counterpart (StableDiffusionXL...)
    whose ``unet`` carries ``adapter``.
    ``face_encoder``: TransFace (tokens of aligned faces); None when only cached tokens are used (training
    previews). ``detector``: a ``fact_lightning.faces`` detector,
    needed only to prepare raw photos (aligned 112x112 faces can be given directly).
    """

    def __init__(self, pipeline, adapter: FaceAdapter, face_encoder: torch.nn.Module | None = None, detector=None):
        attached = adapter.attached_blocks
        if not attached or attached[0] is not pipeline.unet.get_submodule(adapter.sites[0].path):
            raise ValueError("the adapter must be attached to the pipeline's UNet")
        self.pipeline = pipeline
        self.adapter = adapter.eval()
        self.face_encoder = None if face_encoder is None else face_encoder.eval()
        self.detector = detector
        self.pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_components(cls, base, adapter: FaceAdapter, face_encoder: torch.nn.Module | None = None, *,
                        mode: str = "txt2img",
                        controlnet=None, scheduler: str | None = None, detector=None) -> FacePortraitGenerator:
        """Builds the pipeline for ``mode`` over ``base`` (an SD1.5 ``BaseModel`` or an ``SDXLBaseModel``, whose
        UNet ``adapter`` is attached to); ``scheduler`` None is the base's own (:func:`.pipelines.inference_scheduler`).
        An adapter file for a base is loaded with :func:`.bases.load_adapter_for`, which refuses another base's."""
        return cls(build_pipeline(base, mode, controlnet=controlnet, scheduler=scheduler), adapter, face_encoder,
                   detector)

    @property
    def base_type(self) -> str:
        """``"sdxl"`` on an SDXL pipeline (two text encoders), ``"sd15"`` otherwise."""
        return SDXL if getattr(self.pipeline, "text_encoder_2", None) is not None else SD15

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def load_lora(self, source, *, weight: float = 1.0, adapter_name: str = "lora") -> str:
        return load_lora(self.pipeline, source, adapter_name=adapter_name, weight=weight)

    # -- identity ---------------------------------------------------------------------------------------
    def encode_references(self, photos: Sequence[np.ndarray], *, aligned: bool = False,
                          policy=None) -> IdentityCondition:
        """Reference photos of one person (RGB uint8) -> their face tokens.

        Raw photos go through ``faces.reference.prepare_reference`` (detection, face policy, ArcFace
        alignment, head mask: the path ``fact-data`` takes). ``policy`` is fact-data's strict
        ``FacePolicy()`` by default (a refused photo raises ``NoFaceError`` with its reason);
        ``faces.reference.LENIENT_POLICY`` takes the largest face wherever it is. ``aligned=True`` takes
        112x112 faces prepared that way already.
        Encoding is ``faces.encoding.encode_faces``, the same call that caches shard features.
        """
        from fact_lightning.faces.encoding import encode_faces
        from fact_lightning.faces.reference import FacePolicy, prepare_reference

        if len(photos) == 0:
            raise ValueError("give at least one reference photo")
        if self.face_encoder is None:
            raise ValueError("encoding reference photos needs a face encoder")
        if aligned:
            faces = [np.asarray(p, np.uint8) for p in photos]
        else:
            if self.detector is None:
                raise ValueError("raw reference photos need a face detector (or pass aligned faces)")
            faces = [prepare_reference(np.asarray(p, np.uint8), self.detector, policy or FacePolicy()).face
                     for p in photos]
        tokens = encode_faces(self.face_encoder, np.stack(faces), device=self.device)
        return IdentityCondition(torch.from_numpy(tokens.astype(np.float32)))

    @torch.no_grad()
    def identity_embeddings(self, identity: IdentityCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_id, null): (1, 16 * P, C) each; P photos' 16 tokens side by side, and Prj(zeros) per photo."""
        param = next(self.adapter.parameters())
        tokens = identity.tokens.to(param.device, param.dtype)
        p, t, _ = tokens.shape
        e_id = self.adapter.project(tokens).reshape(1, -1, self.adapter.projection.config.output_dim)
        null = self.adapter.null_embedding(1, num_tokens=t).repeat(1, p, 1)
        return e_id, null

    def cross_attention_kwargs(self, identity: IdentityCondition, batch: int, *, adapter_scale: float, guidance: bool,
                               text_only_guidance: bool = False, lora_scale: float | None = None) -> dict:
        """The UNet's ``cross_attention_kwargs`` for ``batch`` images.

        With guidance the batch is diffusers' ``[uncond, cond]``: ``[null]*batch + [e_id]*batch`` (Eq. 5), or
        ``[e_id]*2*batch`` with ``text_only_guidance``; without guidance ``[e_id]*batch``.
        """
        e_id, null = self.identity_embeddings(identity)
        uncond = e_id if text_only_guidance else null
        embeddings = torch.cat([uncond.expand(batch, -1, -1), e_id.expand(batch, -1, -1)]) if guidance \
            else e_id.expand(batch, -1, -1)
        return self.adapter.condition(embeddings, adapter_scale, lora_scale=lora_scale)

    # -- generation -------------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], identity: IdentityCondition, *,
                 negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
                 adapter_scale: float | None = None, guidance_scale: float | None = None,
                 strength: float | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, seed: int | None = 0, num_images: int = 1,
                 height: int | None = None, width: int | None = None, text_only_guidance: bool = False,
                 face_delay: float = 0.0, image=None, mask_image=None, control_image=None,
                 controlnet_conditioning_scale: float = 1.0, lora_scale: float | None = None,
                 keep_outside_mask: bool = True, output_type: str = "pil",
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None, **pipeline_kwargs) -> list:
        """Generates ``num_images`` per prompt. Returns PIL images (or float arrays in [0, 1] for ``"np"``).

        Defaults (None) are the official apps' (:func:`recipe_defaults`): ``adapter_scale`` 0.5 and
        ``guidance_scale`` 7.0 for text-to-image and ControlNet; 0.55, 5.0 and ``strength`` 0.6 for an
        inpainting pipeline; 50 steps. ``negative_prompt``: a string applies to every prompt, None or "" for
        none; the default is ``FaceAdapter_v1.generate``'s fallback, not what the official apps pass
        (``DEFAULT_NEGATIVE_PROMPT``). ``text_only_guidance``: both guidance branches carry e_id (official
        ``cfg_face=False``).

        ``face_delay`` in [0, 1] is our implementation of the official ``delayed_face_condition``: the first
        ``ceil(face_delay * T)`` of the T denoising steps run without the adapter, the rest with it. The
        official call hands the delay to facechain's patched pipeline; stock diffusers drops those arguments
        silently, so we switch the adapter on mid-run from ``callback_on_step_end`` instead. 0 is the adapter
        on every step; 1 is no adapter at all (the base pipeline with this call's guidance and prompts).

        Inpainting (an inpaint pipeline): ``image`` is the template, ``mask_image`` its face region (white =
        regenerate), ``strength`` how far that region is re-noised (1.0: from pure noise; the pipeline runs
        ``int(strength * steps)`` steps). With ``keep_outside_mask`` the template's pixels outside the mask are
        pasted back, so only the face region changes (the inpainting portrait mode). ControlNet:
        ``control_image``. ``lora_scale`` scales a loaded LoRA for this call.

        SDXL only: ``original_size``, ``crops_coords_top_left`` and ``target_size`` are SDXL's micro-conditioning,
        (h, w) and (top, left) pairs; None is the pipeline's default (the generated size; (0, 0)). They apply to
        both guidance branches (diffusers' ``negative_*`` variants follow them unless given in ``pipeline_kwargs``).
        """
        if "scale" in pipeline_kwargs:  # diffusers would swallow it silently: the old name of adapter_scale
            raise TypeError("scale= is not an option of the generator: the adapter scale is adapter_scale=")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        if isinstance(negative_prompt, str):  # diffusers wants the prompt's type: one per prompt
            negative_prompt = [negative_prompt] * len(prompts)
        elif negative_prompt is not None and len(negative_prompt) != len(prompts):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        if num_inference_steps < 1:
            raise ValueError(f"the number of denoising steps must be at least 1, got {num_inference_steps}")
        if num_images < 1:
            raise ValueError(f"the number of images per prompt must be at least 1, got {num_images}")
        if not 0.0 <= face_delay <= 1.0:
            raise ValueError(f"face_delay is a fraction of the steps in [0, 1], got {face_delay}")
        kind = type(self.pipeline).__name__
        inpaint = "Inpaint" in kind
        recipe = recipe_defaults(inpaint)
        adapter_scale = recipe["adapter_scale"] if adapter_scale is None else adapter_scale
        guidance_scale = recipe["guidance_scale"] if guidance_scale is None else guidance_scale
        if strength is not None and not inpaint:
            raise ValueError(f"strength is for inpainting; this is a {kind}")
        strength = recipe["strength"] if strength is None else strength
        if inpaint and not (0.0 < strength <= 1.0 and int(strength * num_inference_steps) >= 1):
            raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step: "
                             "strength must be in (0, 1] and strength x steps at least 1")
        micro = {k: v for k, v in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                                   ("target_size", target_size)) if v is not None}
        if micro and self.base_type != SDXL:  # an SD1.5 pipeline would swallow them silently (its **kwargs)
            raise ValueError(f"{', '.join(micro)} is SDXL's micro-conditioning; this is a {kind}")
        for name, pair in micro.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"{name} must be a pair of integers, got {pair!r}")
            micro[name] = tuple(int(v) for v in pair)
        batch = len(prompts) * num_images
        condition = dict(guidance=guidance_scale > 1.0, text_only_guidance=text_only_guidance, lora_scale=lora_scale)
        with_face = self.cross_attention_kwargs(identity, batch, adapter_scale=adapter_scale, **condition)
        kwargs = dict(
            prompt=prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images, output_type="np",
            cross_attention_kwargs=with_face, **micro,
            generator=None if seed is None else torch.Generator("cpu").manual_seed(seed),
        )
        if face_delay > 0:
            if "callback_on_step_end" in pipeline_kwargs:
                raise ValueError("face_delay uses callback_on_step_end; pass one or the other")
            kwargs["cross_attention_kwargs"] = self.cross_attention_kwargs(identity, batch, adapter_scale=0.0,
                                                                           **condition)
            kwargs["callback_on_step_end"] = _FaceFrom(face_delay, with_face)
        if inpaint:
            if image is None or mask_image is None:
                raise ValueError("inpainting needs a template image and its mask_image")
            kwargs.update(image=image, mask_image=mask_image, strength=strength)
        elif image is not None or mask_image is not None:
            raise ValueError(f"image/mask_image are for inpainting; this is a {kind}")
        if "ControlNet" in kind:
            if control_image is None:
                raise ValueError("a ControlNet pipeline needs control_image")
            kwargs.update(image=control_image, controlnet_conditioning_scale=controlnet_conditioning_scale)
        elif control_image is not None:
            raise ValueError(f"control_image is for a ControlNet pipeline; this is a {kind}")
        with torch.no_grad():
            images = self.pipeline(height=height, width=width, **kwargs, **pipeline_kwargs).images
        if inpaint and keep_outside_mask:
            images = paste_outside_mask(images, image, mask_image)
        if output_type == "np":
            return list(images)
        return [Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)) for x in images]


class _FaceFrom:
    """``callback_on_step_end`` that switches the adapter on once ``fraction`` of the denoising loop is done.

    Step ``i`` of ``T`` runs without the adapter while ``i < fraction * T``; the pipeline reads its
    ``cross_attention_kwargs`` afresh at every step, so the switch takes effect at the next one. ``T`` is the
    steps the pipeline actually runs (``num_timesteps``: after an inpainting strength has shortened the loop).
    """

    def __init__(self, fraction: float, with_face: dict):
        self.fraction = fraction
        self.with_face = with_face

    def __call__(self, pipeline, step: int, timestep, tensors: dict) -> dict:
        if step + 1 == math.ceil(self.fraction * pipeline.num_timesteps):
            pipeline._cross_attention_kwargs = self.with_face  # diffusers' own store, read at every step
        return tensors


def _as_float_array(picture, size: tuple[int, int], channels: int) -> np.ndarray:
    if isinstance(picture, torch.Tensor):
        picture = picture.detach().cpu().numpy()
    if isinstance(picture, np.ndarray):
        arr = picture.astype(np.float32)
        if arr.max() > 1.0:
            arr /= 255.0
        picture = Image.fromarray(np.round(np.squeeze(arr) * 255).astype(np.uint8))
    picture = picture.convert("RGB" if channels == 3 else "L").resize(size, Image.BILINEAR)
    arr = np.asarray(picture, np.float32) / 255.0
    return arr if channels == 3 else arr[..., None]


def paste_outside_mask(images: Sequence[np.ndarray], template, mask) -> list[np.ndarray]:
    """``template * (1 - m) + image * m`` per image (float (H, W, 3) in [0, 1]), ``m`` the mask in [0, 1]."""
    out = []
    for img in images:
        size = (img.shape[1], img.shape[0])
        t, m = _as_float_array(template, size, 3), _as_float_array(mask, size, 1)
        out.append(t * (1.0 - m) + img * m)
    return out

"""Portraits from reference photos: a FACT adapter on a diffusers pipeline's UNet.

Guidance follows the paper's Eq. 5 over both conditions at once. diffusers computes
``uncond + g * (cond - uncond)`` with the batch ``[uncond, cond]``; we pass the identity embeddings in the
same order, ``[Prj(zeros), e_id]``, so the unconditional branch has the negative prompt *and* the id-drop
embedding: ``(1 + w) * H(text, e_id) - w * H(negative, Prj(zeros))`` with ``g = 1 + w`` (the paper's
"CFG scale" is w: its 7.0 is ``guidance_scale=8.0`` in the ``g`` form used by diffusers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fact_lightning.models.injection import FaceAdapter

from .pipelines import build_pipeline, load_lora

log = logging.getLogger(__name__)

DEFAULT_SCALE = 0.5  # adapter scale of the official release (0.5-0.55 for inpainting)
DEFAULT_GUIDANCE = 5.0  # guidance_scale of the official app
DEFAULT_STEPS = 50


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

    ``pipeline``: StableDiffusion{,Inpaint,ControlNet}Pipeline whose ``unet`` carries ``adapter``.
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
                        controlnet=None, scheduler: str = "ddim", detector=None) -> FacePortraitGenerator:
        """Builds the pipeline for ``mode`` over ``base`` (whose UNet ``adapter`` is attached to)."""
        return cls(build_pipeline(base, mode, controlnet=controlnet, scheduler=scheduler), adapter, face_encoder,
                   detector)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    def load_lora(self, source, *, weight: float = 1.0, adapter_name: str = "lora") -> str:
        return load_lora(self.pipeline, source, adapter_name=adapter_name, weight=weight)

    # -- identity ---------------------------------------------------------------------------------------
    def encode_references(self, photos: Sequence[np.ndarray], *, aligned: bool = False) -> IdentityCondition:
        """Reference photos of one person (RGB uint8) -> their face tokens.

        Raw photos go through ``faces.reference.prepare_reference`` (detection, ArcFace alignment, head
        mask: the path ``fact-data`` takes); ``aligned=True`` takes 112x112 faces prepared that way already.
        Encoding is ``faces.encoding.encode_faces``, the same call that caches shard features.
        """
        from fact_lightning.faces.encoding import encode_faces
        from fact_lightning.faces.reference import prepare_reference

        if len(photos) == 0:
            raise ValueError("give at least one reference photo")
        if self.face_encoder is None:
            raise ValueError("encoding reference photos needs a face encoder")
        if aligned:
            faces = [np.asarray(p, np.uint8) for p in photos]
        else:
            if self.detector is None:
                raise ValueError("raw reference photos need a face detector (or pass aligned faces)")
            faces = [prepare_reference(np.asarray(p, np.uint8), self.detector).face for p in photos]
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
                               lora_scale: float | None = None) -> dict:
        """The UNet's ``cross_attention_kwargs`` for ``batch`` images: ``[null]*batch + [e_id]*batch`` with
        guidance (diffusers' [uncond, cond] order), ``[e_id]*batch`` without."""
        e_id, null = self.identity_embeddings(identity)
        embeddings = torch.cat([null.expand(batch, -1, -1), e_id.expand(batch, -1, -1)]) if guidance \
            else e_id.expand(batch, -1, -1)
        return self.adapter.condition(embeddings, adapter_scale, lora_scale=lora_scale)

    # -- generation -------------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], identity: IdentityCondition, *, negative_prompt: str | list[str] | None = None,
                 scale: float = DEFAULT_SCALE, guidance_scale: float = DEFAULT_GUIDANCE,
                 num_inference_steps: int = DEFAULT_STEPS, seed: int | None = 0, num_images: int = 1,
                 height: int | None = None, width: int | None = None, image=None, mask_image=None,
                 control_image=None, controlnet_conditioning_scale: float = 1.0, lora_scale: float | None = None,
                 keep_outside_mask: bool = True, output_type: str = "pil", **pipeline_kwargs) -> list:
        """Generates ``num_images`` per prompt. Returns PIL images (or float arrays in [0, 1] for ``"np"``).

        Inpainting (an inpaint pipeline): ``image`` is the template, ``mask_image`` its face region (white =
        regenerate). With ``keep_outside_mask`` the template's pixels outside the mask are pasted back, so
        only the face region changes (the inpainting portrait mode). ControlNet: ``control_image``.
        ``lora_scale`` scales a loaded LoRA for this call.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images
        guidance = guidance_scale > 1.0
        kwargs = dict(
            prompt=prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images, output_type="np",
            cross_attention_kwargs=self.cross_attention_kwargs(identity, batch, adapter_scale=scale, guidance=guidance,
                                                         lora_scale=lora_scale),
            generator=None if seed is None else torch.Generator("cpu").manual_seed(seed),
        )
        kind = type(self.pipeline).__name__
        if "Inpaint" in kind:
            if image is None or mask_image is None:
                raise ValueError("inpainting needs a template image and its mask_image")
            kwargs.update(image=image, mask_image=mask_image)
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
        if "Inpaint" in kind and keep_outside_mask:
            images = paste_outside_mask(images, image, mask_image)
        if output_type == "np":
            return list(images)
        return [Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)) for x in images]


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

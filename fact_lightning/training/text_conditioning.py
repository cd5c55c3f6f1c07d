"""The text (and, on SDXL, micro-) conditions of a training UNet call, one implementation per base family.

The module asks the base's :func:`text_conditioning` for the UNet's ``encoder_hidden_states`` and
``added_cond_kwargs`` of a batch; everything else in the training step is the same for SD1.5 and SDXL.
A dropped caption (the text drop of the paper) is the empty prompt ``""`` encoded like any other on both bases:
on SDXL that is the encoded empty prompt's tokens *and* pooled embedding, the unconditional text that inference
uses (``fact_lightning.inference``), not the zeros of the stock pipeline's ``force_zeros_for_empty_prompt``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..models.base import BaseModel
from ..models.sdxl_base import SDXLBaseModel, add_time_ids

log = logging.getLogger(__name__)

# Batch keys of SDXL's micro-conditioning (``data/pipeline.py``): (B, 2) pixel pairs and a (B,) flag.
ORIGINAL_SIZE, CROP_TOP_LEFT, MICRO_RECORDED = "original_size", "crop_top_left", "micro_conditioning"


@dataclass
class TextConditions:
    """What a UNet call takes besides latents, timesteps and the adapter's kwargs."""

    tokens: torch.Tensor  # (B, 77, cross_attention_dim): encoder_hidden_states
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (pooled) and time_ids


class SD15TextConditioning:
    """One CLIP text encoder's last hidden states; no added conditions."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def frozen_modules(self) -> tuple[nn.Module, ...]:
        return (self.text_encoder,)

    @torch.no_grad()
    def encode_text(self, captions: list[str], to_device) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(to_device(ids))[0]

    def conditions(self, captions: list[str], batch: dict, to_device) -> TextConditions:
        return TextConditions(self.encode_text(captions, to_device))

    def report_missing(self) -> None:
        """Nothing to say: SD1.5 takes no micro-conditioning."""


class SDXLTextConditioning:
    """Both CLIP encoders' penultimate states side by side, the pooled embedding, and each sample's time ids.

    time_ids = (original size, crop top-left, target size) per sample: the first two from the batch
    (``fact-data`` records them in each image's meta), the target the crop's own size. A batch from shards
    without them (made before ``fact-data`` recorded them) trains with the crop's size and (0, 0), which the data
    stage fills in; that is said once per run, at the first such batch.
    """

    def __init__(self, base: SDXLBaseModel):
        self.base = base
        self._warned = False
        self._missing: torch.Tensor | None = None  # on the device: whether a batch lacked the fields, unread

    def report_missing(self) -> None:
        """Says once per run that shards lack the micro-conditioning; called at logging steps, where reading the
        device flag costs no extra host sync."""
        if self._missing is not None and not self._warned and bool(self._missing):
            log.warning("the shards hold no micro-conditioning (original size, crop top-left) for some images (made "
                        "by an older fact-data): SDXL trains with the crop's own size and (0, 0) for them; rebuild "
                        "the shards to pass the photos' own")
            self._warned = True

    @property
    def frozen_modules(self) -> tuple[nn.Module, ...]:
        return self.base.text_encoder, self.base.text_encoder_2

    def time_ids(self, batch: dict) -> torch.Tensor:
        """(B, 6) float32 time ids of a batch (crops of ``batch["pixels"]``' size)."""
        size = tuple(batch["pixels"].shape[-2:])
        recorded = batch.get(MICRO_RECORDED)
        if ORIGINAL_SIZE not in batch or recorded is None:
            self._missing = torch.tensor(True)
            return add_time_ids(size, (0, 0), size).expand(len(batch["key"]), -1)
        missing = torch.as_tensor(recorded).logical_not().any()  # read at a logging step (report_missing)
        self._missing = missing if self._missing is None else self._missing.to(missing.device) | missing
        return add_time_ids(batch[ORIGINAL_SIZE], batch[CROP_TOP_LEFT], size)

    def encode_text(self, captions: list[str], to_device) -> torch.Tensor:
        return self.base.encode_prompt(captions, to_device).tokens

    def conditions(self, captions: list[str], batch: dict, to_device) -> TextConditions:
        prompts = self.base.encode_prompt(captions, to_device)
        return TextConditions(prompts.tokens, prompts.added_cond_kwargs(to_device(self.time_ids(batch))))


def text_conditioning(base: BaseModel | SDXLBaseModel) -> SD15TextConditioning | SDXLTextConditioning:
    """The text conditioning of a built base model, chosen by its family."""
    if isinstance(base, SDXLBaseModel):
        return SDXLTextConditioning(base)
    return SD15TextConditioning(base.tokenizer, base.text_encoder)

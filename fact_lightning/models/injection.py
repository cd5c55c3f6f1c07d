"""Attach FACT adapters to a diffusers UNet and condition it through ``cross_attention_kwargs``.

Each adapted ``BasicTransformerBlock`` gets its ``GatedFaceAttention`` in the block's own GLIGEN slot
(``block.fuser``, applied after self-attention and before ``norm2``/cross-attention: exactly where SFAGS
sits). A forward pre-hook takes our ``"fact"`` key out of ``cross_attention_kwargs`` and hands it to the
fuser as GLIGEN's ``objs``; the block pops that before its attention processors run, so processors (and
LoRA, ControlNet, any pipeline) never see an unknown key.

The adapter weights stay owned by ``FaceAdapter``: the UNet holds unregistered references only, so the
UNet's own state dict, ``save_pretrained`` and LoRA loading are those of the plain base model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .resampler import PerceiverResampler, ResamplerConfig
from .sfags import FaceCondition, GatedFaceAttention
from .unet_layout import BlockSite, transformer_block_sites

log = logging.getLogger(__name__)

CONDITION_KEY = "fact"


class FaceAdapter(nn.Module):
    """Prj plus one SFAGS per transformer block: every trainable weight of FACT."""

    def __init__(self, sites: list[BlockSite], projection: ResamplerConfig | None = None):
        super().__init__()
        self.sites = list(sites)
        self.projection = PerceiverResampler(projection)
        self.blocks = nn.ModuleDict(
            {s.key: GatedFaceAttention(s.width, s.cross_attention_dim, s.heads) for s in self.sites}
        )
        for site in self.sites:
            self.blocks[site.key].name = site.path
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._attached: list[nn.Module] = []

    @classmethod
    def for_unet(cls, unet: nn.Module, projection: ResamplerConfig | None = None) -> FaceAdapter:
        """An adapter sized for ``unet`` (random projection, zero gates), attached to it."""
        sites = transformer_block_sites(unet)
        cfg = projection or ResamplerConfig(output_dim=sites[0].cross_attention_dim)
        if cfg.output_dim != sites[0].cross_attention_dim:
            raise ValueError(f"projection output_dim {cfg.output_dim} != UNet cross_attention_dim {sites[0].cross_attention_dim}")
        adapter = cls(sites, cfg)
        adapter.attach(unet)
        return adapter

    # -- wiring -----------------------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        """Installs the adapters into ``unet``'s transformer blocks (the UNet's weights are untouched)."""
        if self._attached:
            raise RuntimeError("this adapter is already attached; call detach() first")
        found = {s.path: s for s in transformer_block_sites(unet)}
        if set(found) != {s.path for s in self.sites}:
            raise ValueError(
                "this adapter was built for another UNet layout: "
                f"missing {sorted(set(found) - {s.path for s in self.sites})[:3]}, "
                f"extra {sorted({s.path for s in self.sites} - set(found))[:3]}"
            )
        for site in self.sites:
            if found[site.path] != site:
                raise ValueError(f"block {site.path} is {found[site.path]}, the adapter expects {site}")
            block = unet.get_submodule(site.path)
            if getattr(block, "fuser", None) is not None:
                raise ValueError(f"block {site.path} already has a GLIGEN fuser; cannot attach a face adapter")
            # Bypass nn.Module registration: the adapter, not the UNet, owns these weights.
            object.__setattr__(block, "fuser", self.blocks[site.key])
            self._hooks.append(block.register_forward_pre_hook(_route_condition, with_kwargs=True))
            self._attached.append(block)

    @property
    def attached_blocks(self) -> list[nn.Module]:
        """The UNet transformer blocks this adapter is attached to, in ``sites`` order (empty if detached)."""
        return list(self._attached)

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for block in self._attached:
            object.__delattr__(block, "fuser")
        self._hooks, self._attached = [], []

    # -- conditioning -----------------------------------------------------------------------------------
    def project(self, face_tokens: torch.Tensor) -> torch.Tensor:
        """Face-encoder tokens (B, N, D) -> identity embedding (B, num_queries, cross_attention_dim)."""
        return self.projection(face_tokens)

    def null_embedding(self, batch: int = 1, num_tokens: int = 144) -> torch.Tensor:
        """The id-drop embedding Prj(zeros), for face dropout and classifier-free guidance.

        ``num_tokens`` must be the face encoder's token count (144 for TransFace): the resampler attends
        over them, so their number changes Prj(zeros).
        """
        param = next(self.projection.parameters())
        zeros = torch.zeros(batch, num_tokens, self.projection.config.token_dim, device=param.device, dtype=param.dtype)
        return self.project(zeros)

    @staticmethod
    def condition(
        face_embeddings: torch.Tensor, scale: float | torch.Tensor = 1.0, *, lora_scale: float | None = None, **extra
    ) -> dict:
        """``cross_attention_kwargs`` for a UNet call conditioned on ``face_embeddings`` at adapter scale ``scale``.

        ``lora_scale`` becomes diffusers' own ``"scale"`` key (the LoRA scale); other keyword arguments are
        passed through unchanged.
        """
        if lora_scale is not None:
            extra["scale"] = lora_scale
        return {**extra, CONDITION_KEY: FaceCondition(face_embeddings, scale)}

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Records, per block path, (input x, increment GSA(x)) of the forward passes inside the context."""
        records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for block in self.blocks.values():
            block.sink = records
        try:
            yield records
        finally:
            for block in self.blocks.values():
                block.sink = None


def _route_condition(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Moves our condition from ``cross_attention_kwargs`` into the block's GLIGEN slot."""
    position = _cross_attention_kwargs_position(type(block))
    if "cross_attention_kwargs" in kwargs:
        given = kwargs["cross_attention_kwargs"]
    elif len(args) > position:  # gradient checkpointing calls blocks positionally
        given = args[position]
    else:
        given = None
    if not given or CONDITION_KEY not in given:
        return args, kwargs
    routed = {k: v for k, v in given.items() if k != CONDITION_KEY}
    routed["gligen"] = {"objs": given[CONDITION_KEY]}
    if "cross_attention_kwargs" in kwargs:
        kwargs = {**kwargs, "cross_attention_kwargs": routed}
    else:
        args = (*args[:position], routed, *args[position + 1 :])
    return args, kwargs


@functools.cache
def _cross_attention_kwargs_position(block_type: type) -> int:
    params = list(inspect.signature(block_type.forward).parameters)
    return params.index("cross_attention_kwargs") - 1  # minus self


def mark_only_adapter_trainable(unet: nn.Module, adapter: FaceAdapter, *frozen: nn.Module) -> None:
    """Freezes the UNet (and any other base modules given) and makes every adapter weight trainable."""
    for module in (unet, *frozen):
        module.requires_grad_(False)
        module.eval()
    adapter.requires_grad_(True)

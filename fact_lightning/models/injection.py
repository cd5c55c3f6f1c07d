"""Attach FACT adapters to a diffusers UNet and condition it through ``cross_attention_kwargs``.

Each adapted ``BasicTransformerBlock`` gets its ``GatedFaceAttention`` in the block's own GLIGEN slot
(``block.fuser``, applied after self-attention and before ``norm2``/cross-attention: exactly where SFAGS
sits). A forward pre-hook takes our ``"fact"`` key out of ``cross_attention_kwargs`` and hands it to the
fuser as GLIGEN's ``objs``; the block pops that before its attention processors run, so processors (and
LoRA, ControlNet, any pipeline) never see an unknown key. The hook is plain dictionary work with the
argument position found once at attach time, so ``torch.compile`` traces a UNet with adapters without
graph breaks.

The fuser is a registered submodule of its block, so everything that walks the module tree carries it with
the UNet: ``unet.to(device/dtype)``, ``pipe.to(...)``, accelerate's offload hooks (which call
``module.to``), ``copy.deepcopy(unet)``, ``torch.compile``. The weights stay owned by ``FaceAdapter``: a
state-dict hook on each adapted block leaves them out of the UNet's own ``state_dict()`` (so
``save_pretrained`` writes the plain base model), and a load hook lets the UNet load a base state dict
strictly. Note that ``unet.parameters()`` does include the adapter's weights while it is attached
(as a GLIGEN UNet's include its fuser): freeze the base with ``mark_only_adapter_trainable``.
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
from .sfags import TRAINING_ADAPTER_SCALE, FaceCondition, GatedFaceAttention
from .unet_layout import BlockSite, SiteChoice, select_sites, transformer_block_sites

log = logging.getLogger(__name__)

CONDITION_KEY = "fact"
FUSER = "fuser"  # BasicTransformerBlock's GLIGEN slot, where each SFAGS sits


class FaceAdapter(nn.Module):
    """Prj plus one SFAGS per adapted transformer block (``sites``): every trainable weight of FACT."""

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
        # Block path -> the base's norm2 state at the precision it had when first seen (see base_norm2_state).
        # A plain dict, not buffers: casting the adapter or the UNet must not round these.
        self._base_norm2: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def for_unet(cls, unet: nn.Module, projection: ResamplerConfig | None = None,
                 sites: SiteChoice = "block") -> FaceAdapter:
        """An adapter sized for ``unet`` (random projection, zero gates), attached to it.

        ``sites``: which transformer blocks take an SFAGS (:func:`select_sites`): ``"block"`` (all, SD1.5's
        design), ``"stack"`` (the first block of each transformer stack, for SDXL) or a list of site names.
        """
        sites = select_sites(unet, sites)
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
        # The adapter may cover a subset of the UNet's blocks (one per stack, an explicit list): every site it has
        # must exist in this UNet with the same sizes; blocks it does not name stay as they are.
        found = {s.path: s for s in transformer_block_sites(unet)}
        absent = [s.path for s in self.sites if s.path not in found]
        if absent:
            raise ValueError(f"this adapter was built for another UNet layout: this UNet has no transformer block "
                             f"{absent[:3]} ({len(absent)} of the adapter's {len(self.sites)} sites)")
        for site in self.sites:
            if found[site.path] != site:
                raise ValueError(f"block {site.path} is {found[site.path]}, the adapter expects {site}")
            if getattr(unet.get_submodule(site.path), FUSER, None) is not None:
                raise ValueError(f"block {site.path} already has a GLIGEN fuser; cannot attach a face adapter")
        for site in self.sites:
            block = unet.get_submodule(site.path)
            self.remember_base_norm2(site.path, block.norm2.state_dict())
            setattr(block, FUSER, self.blocks[site.key])  # registered: .to(), offload hooks, deepcopy carry it
            route = functools.partial(_route_condition, _cross_attention_kwargs_position(block))
            self._hooks += [
                block.register_forward_pre_hook(route, with_kwargs=True),
                block.register_state_dict_post_hook(_drop_fuser_state),
                block.register_load_state_dict_pre_hook(_keep_fuser_state),
            ]
            self._attached.append(block)
        # Blocks without an adapter (sites="stack" or a list) get the same call's kwargs: they only drop our key,
        # so that their attention processors never see it (diffusers would warn once per block and call).
        adapted = {s.path for s in self.sites}
        for path in [p for p in found if p not in adapted]:
            block = unet.get_submodule(path)
            drop = functools.partial(_route_condition, _cross_attention_kwargs_position(block), drop=True)
            self._hooks.append(block.register_forward_pre_hook(drop, with_kwargs=True))

    @property
    def attached_blocks(self) -> list[nn.Module]:
        """The UNet transformer blocks this adapter is attached to, in ``sites`` order (empty if detached)."""
        return list(self._attached)

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for block in self._attached:
            delattr(block, FUSER)
        self._hooks, self._attached = [], []

    # -- the base's norm2, which the official format stores ------------------------------------------------
    def remember_base_norm2(self, path: str, state: dict[str, torch.Tensor]) -> None:
        """Records the norm2 state of block ``path`` at its current precision, unless an equal-or-finer one is known.

        A known record is kept when it equals ``state`` once rounded to ``state``'s dtype (the same weights,
        seen again after the base was cast to bf16/fp16); otherwise ``state`` replaces it.
        """
        if any(v.is_meta for v in state.values()):
            return  # a UNet on the meta device (sizes only, to count FLOPs) has no values to keep
        known = self._base_norm2.get(path)
        if known is not None and _rounds_to(known, state):
            return
        self._base_norm2[path] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def base_norm2_state(self, path: str) -> dict[str, torch.Tensor]:
        """The attached block's norm2 at the base's original precision (what the official format stores).

        "Original" is the precision norm2 had when the adapter first saw it: when attached (or, for a loaded
        official file, the file's own values). Casting the UNet afterwards (``unet.to(torch.bfloat16)``)
        does not lose it. A base loaded in bf16 has bf16 as its original precision. If the UNet's norm2 was
        changed since (not just cast), the current values are returned.
        """
        block = self._attached[[s.path for s in self.sites].index(path)]
        current = block.norm2.state_dict()
        known = self._base_norm2.get(path)
        if known is not None and _rounds_to(known, current):
            return dict(known)
        return {k: v.detach() for k, v in current.items()}

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
        face_embeddings: torch.Tensor,
        adapter_scale: float | torch.Tensor = TRAINING_ADAPTER_SCALE,
        *,
        lora_scale: float | None = None,
        **extra,
    ) -> dict:
        """``cross_attention_kwargs`` for a UNet call conditioned on ``face_embeddings`` at ``adapter_scale``.

        ``adapter_scale`` is a in Eq. 2 (a float, or a (B,) tensor per sample). ``lora_scale`` becomes
        diffusers' own ``"scale"`` key (the LoRA scale); other keyword arguments are passed through unchanged,
        except ``scale``, refused as ambiguous (it was this method's name for the adapter scale).
        """
        if "scale" in extra:
            raise TypeError("condition() got 'scale': pass adapter_scale= (the face adapter's a) or lora_scale= (LoRA)")
        if lora_scale is not None:
            extra["scale"] = lora_scale
        return {**extra, CONDITION_KEY: FaceCondition(face_embeddings, adapter_scale)}

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


def _cross_attention_kwargs_position(block: nn.Module) -> int:
    """Where ``cross_attention_kwargs`` sits among the block's positional arguments (gradient checkpointing
    calls blocks positionally). Found once, at attach time: the hook itself does no introspection."""
    params = list(inspect.signature(type(block).forward).parameters)
    return params.index("cross_attention_kwargs") - 1  # minus self


def _route_condition(position: int, block: nn.Module, args: tuple, kwargs: dict,
                     drop: bool = False) -> tuple[tuple, dict] | None:
    """Moves our condition from ``cross_attention_kwargs`` into the block's GLIGEN slot (``objs``); with ``drop``
    (a block without an adapter) only removes it."""
    by_keyword = "cross_attention_kwargs" in kwargs
    if by_keyword:
        given = kwargs["cross_attention_kwargs"]
    elif len(args) > position:
        given = args[position]
    else:
        return None
    if given is None or CONDITION_KEY not in given:
        return None
    routed = dict(given)
    condition = routed.pop(CONDITION_KEY)
    if not drop:
        routed["gligen"] = {"objs": condition}
    if by_keyword:
        return args, {**kwargs, "cross_attention_kwargs": routed}
    return (*args[:position], routed, *args[position + 1 :]), kwargs


def _drop_fuser_state(block: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: the UNet's state dict stays the base model's (the adapter saves its own weights)."""
    for key in [k for k in state_dict if k.startswith(prefix + FUSER + ".")]:
        del state_dict[key]


def _keep_fuser_state(block: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a base state dict (no adapter keys) loads strictly; the adapter keeps its weights."""
    fuser = getattr(block, FUSER)
    for key, value in fuser.state_dict(prefix=prefix + FUSER + ".", keep_vars=True).items():
        state_dict.setdefault(key, value)


def _rounds_to(fine: dict[str, torch.Tensor], coarse: dict[str, torch.Tensor]) -> bool:
    """Whether ``fine`` rounded to ``coarse``'s dtypes equals ``coarse`` (same keys)."""
    return fine.keys() == coarse.keys() and all(
        torch.equal(fine[k].to(coarse[k].dtype), coarse[k].detach().to("cpu")) for k in fine
    )


def mark_only_adapter_trainable(unet: nn.Module, adapter: FaceAdapter, *frozen: nn.Module) -> None:
    """Freezes the UNet (and any other base modules given) and makes every adapter weight trainable."""
    for module in (unet, *frozen):
        module.requires_grad_(False)
        module.eval()
    adapter.requires_grad_(True)

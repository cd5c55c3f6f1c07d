"""The FACT LightningModule: wires frozen SD1.5 or SDXL parts, the adapter, the condition decisions and the losses.

It computes nothing new itself: losses are in ``losses.py``, decisions and the shuffle curriculum in
``conditioning.py``, the base family's text (and SDXL's micro-) conditions in ``text_conditioning.py``, the
adapter in ``models/``. Checkpoints hold only the adapter's weights (plus optimizer state, the curriculum and
the skipped-step count).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from torch.distributed import ReduceOp

from . import losses, resume
from .conditioning import (VALIDATION_STEP, ConditionProbabilities, FaceChoice, ShuffleSchedule, decide, draw_normal,
                            draw_timesteps, sample_generators, validation_probabilities)
from ..checks import Range
from ..errors import UserError
from ..files import sha256_file
from ..models.injection import FaceAdapter, mark_only_adapter_trainable
from ..models.resampler import ResamplerConfig
from ..models.sfags import TRAINING_ADAPTER_SCALE
from ..models.unet_layout import SiteChoice, depth_tag
from .base_spec import BaseModelSpec
from .init_adapter import check_init_adapter, load_init_adapter
from .nonfinite import NonFiniteTracker, TrainingDiverged
from .step_logging import ValidationTally, gate_values, log_step
from .text_conditioning import text_conditioning

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapter."
LATENT_MEAN, LATENT_STD = "latent_mean", "latent_std"  # batch keys of cached VAE latents


class FactModule(pl.LightningModule):
    """Trains Prj and the SFAGS adapters on a frozen SD1.5 or SDXL base (paper Eq. 3-4).

    Args:
        base: which frozen parts (``TinyBase``/``PretrainedBase`` for SD1.5, ``TinySDXLBase``/
            ``PretrainedSDXLBase`` for SDXL), built in ``configure_model``.
        projection: the perceiver's sizes; its ``output_dim`` must be the UNet's cross-attention width.
        sites: which transformer blocks take an SFAGS: ``block`` (every one: the paper's SD1.5 design),
            ``stack`` (the first block of each transformer stack: SDXL's 11 sites) or a list of site names.
        optimizer, lr_scheduler: callables over the adapter's parameters (LightningCLI fills them). A fused
            Adam/AdamW (``fused: true``) skips a non-finite step on the device, without a host sync.
        adapter_scale: a in Eq. 2 during training (1.0 in the paper).
        shuffle: the face-shuffle curriculum, evaluated at every optimizer step (0.2 -> 0.6 in the paper); its
            ramp ends with the run (``trainer.max_steps``) unless ``ramp_steps`` is given.
        face_drop, text_drop: condition-drop probabilities; joint_drop: an extra probability of dropping both.
        mask_loss_prob: p of M_r(p); mask_loss_normalize: ``all_pixels`` (the paper's plain norm) or
            ``mask_area`` (a masked sample divided by its face area). M is the binary face region on the
            latent grid (``losses.face_region``), in the loss and in FAIR.
        fair_weight: lambda in Eq. 4.
        fair_denominator: ``live`` (Eq. 3 as written: gradient through both norms, reaching Prj and earlier
            blocks' adapters through x) or ``detached`` (x a constant normaliser; an ablation, not the paper).
        seed: seeds every per-sample draw together with the step and the sample key.
        max_nonfinite_steps: stop the run (an error, no export) after this many consecutive non-finite steps.
        check_base_on_resume: refuse a checkpoint that was trained on another base model.
        gradient_checkpointing: recompute the UNet's blocks in backward (less memory, ~30% slower).
        channels_last: the frozen UNet and VAE in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the UNet (the adapter inside it compiles with it).
        adapter_dtype: the trainable weights' dtype (float64 only for numerical checks on CPU).
        init_adapter: start from these adapter weights (an official FACT ``.ckpt``/``.bin`` or one of our
            ``adapter.safetensors``), checked against the model (``init_adapter.py``). Not a resume: the
            optimizer, step and curriculum start fresh; its sha256 is recorded (``init_adapter_sha256``).
    """

    def __init__(
        self,
        base: BaseModelSpec,
        projection: ResamplerConfig = ResamplerConfig(),  # a frozen value object: the official sizes
        sites: SiteChoice = "block",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        adapter_scale: float = TRAINING_ADAPTER_SCALE,
        shuffle: ShuffleSchedule = ShuffleSchedule(),  # a frozen value object
        face_drop: float = 0.1,
        text_drop: float = 0.1,
        joint_drop: float = 0.0,
        mask_loss_prob: float = 0.5,
        mask_loss_normalize: Literal["all_pixels", "mask_area"] = "all_pixels",
        fair_weight: float = 0.01,
        fair_denominator: Literal["live", "detached"] = "live",
        seed: int = 0,
        max_nonfinite_steps: int = 10,
        check_base_on_resume: bool = True,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        adapter_dtype: Literal["float32", "float64"] = "float32",
        init_adapter: str | None = None,
    ):
        super().__init__()
        # Plain values only: checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["base", "optimizer", "lr_scheduler", "projection", "shuffle"])
        self.hparams["projection"] = projection.to_dict()
        self.hparams["shuffle"] = asdict(shuffle)
        # The source's content, in every checkpoint's hyper_parameters and TensorBoard's hparams (config.yaml
        # has the path). A missing file is named by fact-train's weights check, then by configure_model.
        source = Path(init_adapter).expanduser() if init_adapter else None
        self.hparams["init_adapter_sha256"] = sha256_file(source) if source and source.is_file() else None
        self.base_spec = base
        self.projection_config = projection
        self.shuffle_config = shuffle  # as configured; ``shuffle`` is the schedule in use (its ramp resolved)
        self.shuffle = shuffle
        self._ramp_source = "model.shuffle.ramp_steps"
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.probabilities(0)  # validates the probabilities early
        for name, value, allowed in (("model.adapter_scale", adapter_scale, Range(float, 0.0)),
                                     ("model.fair_weight", fair_weight, Range(float, 0.0)),
                                     ("model.seed", seed, Range(int, 0, 2**32 - 1))):
            allowed.check(value, name)  # a NaN weight or scale trains silently to nothing: refuse it here
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        if fair_denominator not in losses.FAIR_DENOMINATORS:
            raise ValueError(f"fair_denominator must be one of {losses.FAIR_DENOMINATORS}, got {fair_denominator!r}")
        self.strict_loading = False  # frozen weights are not in our checkpoints; on_load_checkpoint checks strictly
        self.adapter: FaceAdapter | None = None
        self.nonfinite_steps = 0  # skipped steps of the whole run (checkpointed)
        self._nonfinite = NonFiniteTracker()
        self._throughput: tuple[float, int] | None = None  # (time, batches) at the last logging step
        self._saved_shuffle: dict | None = None  # the curriculum a resumed checkpoint ran with
        # The optimizer settings as configured, before a restore puts the checkpoint's back (resume.py).
        self._configured_optimizer: tuple[list[dict], list[float] | None] | None = None
        self._val_tally = ValidationTally()

    # -- building --------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.adapter is not None:
            return
        base = self.base_spec.build()
        # The adapter is registered before the UNet that also holds its blocks (in their GLIGEN slots), so that
        # each adapter weight's first name, the one torch.distributed.checkpoint uses, is its checkpoint key
        # (adapter.blocks.*): registered after, the blocks were named unet.*.fuser.* and an FSDP2 resume left
        # them at their fresh values without a word.
        self.adapter = FaceAdapter.for_unet(base.unet, self.projection_config, self.hparams.sites)
        # Registered here so that Lightning moves them; the text conditioning holds the same modules.
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        self.tokenizer, self.noise_scheduler = base.tokenizer, base.noise_scheduler
        self.base_model = base  # the built parts (BaseModel or SDXLBaseModel), for callbacks: previews, exports
        self.text = text_conditioning(base)
        self.text_encoder_2 = getattr(base, "text_encoder_2", None)  # SDXL's second encoder
        self._frozen = (self.unet, self.vae, *self.text.frozen_modules)
        self.adapter.to(getattr(torch, self.hparams.adapter_dtype))
        if self.hparams.init_adapter:
            # After the cast (a float64 file stays exact in a float64 adapter; float16/32 files widen exactly)
            # and before any sharding. On a resume Lightning restores the checkpoint's adapter after this: its
            # weights win.
            load_init_adapter(self.hparams.init_adapter, self.adapter, self.unet)
        mark_only_adapter_trainable(self.unet, self.adapter, *self._frozen[1:])
        if self.hparams.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if self.hparams.channels_last:
            for module in (self.unet, self.vae):  # nn.Module.to: diffusers' own .to warns about an empty fp32 list
                torch.nn.Module.to(module, memory_format=torch.channels_last)
        self.depth = {s.path: depth_tag(s, self.unet.config) for s in self.adapter.sites}
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.adapter.blocks.values():
                fully_shard(block, mesh=mesh)
            fully_shard(self.adapter.projection, mesh=mesh)
        if self.hparams.compile:
            self.unet.compile()  # in place: the module, its paths and the adapter's hooks stay as they are
        log.info("adapter: %d blocks, %.2fM trainable parameters", len(self.adapter.sites),
                 sum(p.numel() for p in self.adapter.parameters()) / 1e6)

    def check_init_adapter(self) -> None:
        """``model.init_adapter``'s checks that need no built model (``fact-train`` runs them before writing)."""
        if self.hparams.init_adapter:
            check_init_adapter(self.hparams.init_adapter, self.projection_config)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.adapter is not None:  # frozen parts stay in eval mode (no dropout, fixed norms)
            for module in self._frozen:
                module.eval()
            self.adapter.train(mode)  # its blocks sit inside the UNet, which was just set to eval
        return self

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.adapter.parameters())
        for group in optimizer.param_groups:  # the optimizer's own checks let lr=nan and lr=inf through
            Range(float, 0.0, min_open=True).check(float(group["lr"]), "model.optimizer lr")
        if self.scheduler_factory is None:
            self._configured_optimizer = (resume.settings(optimizer), None)
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        self._configured_optimizer = (resume.settings(optimizer), list(getattr(scheduler, "base_lrs", [])) or None)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def probabilities(self, step: int) -> ConditionProbabilities:
        """The condition probabilities at optimizer step ``step`` (p_shuffle from the curriculum).

        Outside a fit (direct calls, benchmarks) a ramp that follows the run's length has no length yet and
        p_shuffle stays at the curriculum's start.
        """
        hp = self.hparams
        step = max(step, 0)
        p_shuffle = self.shuffle.start if self.shuffle.ramp_steps is None else self.shuffle.value(step)
        return ConditionProbabilities(p_shuffle, hp.face_drop, hp.text_drop, hp.mask_loss_prob, hp.joint_drop)

    # -- the curriculum's length -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Before any checkpoint is restored (either strategy order), so saved and current schedules compare.
        if stage != "fit":
            return
        self.shuffle = self.shuffle_config  # each fit resolves the configured schedule for its own length
        self._ramp_source = "model.shuffle.ramp_steps"
        if self.shuffle.ramp_steps is None and self.trainer.max_steps > 0:
            self.shuffle = self.shuffle.resolve(self.trainer.max_steps)
            self._ramp_source = "trainer.max_steps"

    def on_train_start(self) -> None:
        self._apply_configured_optimizer()
        if self.shuffle.ramp_steps is None:  # an epoch-bounded run: its length is known once data is set up
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise UserError("model.shuffle.ramp_steps is unset (the run's length) and the run has no known "
                                "length: set trainer.max_steps or model.shuffle.ramp_steps")
            self.shuffle = self.shuffle.resolve(int(total))
            self._ramp_source = "the run's estimated steps"
        last = self.trainer.max_steps
        short = f"; the run stops at step {last}, before that" if 0 < last < self.shuffle.ramp_end else ""
        s = self.shuffle
        # Lightning's rank-0 logger: shown by fact-train beside Lightning's own start-of-run lines.
        rank_zero_info(f"shuffle curriculum: p_shuffle {s.start:g} -> {s.end:g} ({s.shape}) from step "
                       f"{s.warmup_steps}, reaching {s.end:g} at step {s.ramp_end} ({self._ramp_source}){short}")
        saved, self._saved_shuffle = self._saved_shuffle, None
        if saved is not None and saved != asdict(self.shuffle):
            log.warning("the shuffle curriculum changed since the checkpoint (%s -> %s); continuing with the new one",
                        saved, asdict(self.shuffle))

    def _apply_configured_optimizer(self) -> None:
        """A restored optimizer runs with this run's configured settings (lr, betas, weight decay), not the
        checkpoint's: what config.yaml says is what the run does (resume.py)."""
        if self._configured_optimizer is None or not self.trainer.optimizers:
            return
        schedulers = self.trainer.lr_scheduler_configs
        changes = resume.apply_optimizer_settings(self.trainer.optimizers[0],
                                                  schedulers[0].scheduler if schedulers else None,
                                                  *self._configured_optimizer)
        if changes:
            rank_zero_info("resumed with changed optimizer settings, applied: "
                           + resume.describe([(f"model.optimizer.{k}", old, new) for k, old, new in changes]))

    # -- the step --------------------------------------------------------------------------------------
    def _from_host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor made on the host during the step (token ids, per-sample draws, decisions) on the module's
        device without making the host wait: a plain ``.to`` from pageable memory waits for the device's queue
        to drain, every step; pinned memory and ``non_blocking`` let the host queue the rest of the step."""
        if t.device.type == "cpu" and self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, dtype, non_blocking=True)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """(B, 77, cross_dim) token states of ``captions``: the UNet's ``encoder_hidden_states``."""
        return self.text.encode_text(captions, self._from_host)

    def face_embeddings(self, batch: dict, face: torch.Tensor) -> torch.Tensor:
        """(B, T, cross_dim) identity tokens: paired, shuffled or Prj(zeros) per ``face`` (B,) FaceChoice."""
        face = self._from_host(face)
        tokens = torch.where((face == FaceChoice.SHUFFLED).view(-1, 1, 1), batch["shuffled_tokens"], batch["tokens"])
        embeddings = self.adapter.project(tokens.to(self.adapter.projection.latents.dtype))
        null = self.adapter.null_embedding(1, tokens.shape[1])
        return torch.where((face == FaceChoice.DROPPED).view(-1, 1, 1), null.expand_as(embeddings), embeddings)

    def latent_distribution(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's latent distribution for the batch's crops: cached in the shards when they
        hold ``latent_mean``/``latent_std`` (``fact-data`` with a VAE), else computed by the frozen VAE."""
        if LATENT_MEAN in batch:
            mean = batch[LATENT_MEAN].to(self.device, self.vae.dtype)
            return mean, batch[LATENT_STD].to(self.device, self.vae.dtype)
        dist = self.vae.encode(batch["pixels"].to(self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def compute_losses(self, batch: dict, step: int, probabilities: ConditionProbabilities | None = None) -> dict:
        """Loss terms for one batch; every random draw from per-sample generators keyed by (seed, step, key).

        A negative ``step`` gives fixed draws and the curriculum's starting p_shuffle; ``probabilities``
        overrides the step's (validation: no drop, no shuffle). ``diffusion_per_sample`` and ``fair_per_sample``
        hold the (B,) terms that the batch means are taken over.
        """
        generators = sample_generators(self.hparams.seed, step, list(batch["key"]))
        probabilities = probabilities or self.probabilities(step)
        decisions = decide(generators, probabilities, batch.get("shuffle_available"))
        with torch.no_grad():
            mean, std = self.latent_distribution(batch)
            eps = self._from_host(draw_normal(generators, tuple(mean.shape[1:])), mean.dtype)
            latents = (mean + std * eps) * self.vae.config.scaling_factor
            latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
            captions = ["" if drop else c for c, drop in zip(batch["caption"], decisions.drop_text.tolist())]
            text = self.text.conditions(captions, batch, self._from_host)
        noise = self._from_host(draw_normal(generators, tuple(latents.shape[1:])), latents.dtype)
        timesteps = self._from_host(draw_timesteps(generators, self.noise_scheduler.config.num_train_timesteps))
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        embeddings = self.face_embeddings(batch, decisions.face)
        latent_hw = tuple(latents.shape[-2:])
        with self.adapter.capture() as records:
            kwargs = self.adapter.condition(embeddings, self.hparams.adapter_scale)
            pred = self.unet(noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=text.tokens,
                             added_cond_kwargs=text.added_cond_kwargs, cross_attention_kwargs=kwargs).sample
            fair = losses.fair_per_block(records, batch["mask"], latent_hw, self.hparams.fair_denominator)
        # Eq. 4's M: the binary face region on the latent grid, as FAIR's M_x is on each block's grid.
        face_latent = losses.face_region(batch["mask"].to(latents.dtype), latent_hw)
        loss_mask = losses.random_loss_masks(face_latent, self._from_host(decisions.use_mask))
        per_sample = losses.masked_diffusion_loss(pred, target, loss_mask, self.hparams.mask_loss_normalize)
        diffusion = per_sample.mean()
        fair_means = {path: value.mean() for path, value in fair.items()}
        fair_total = torch.stack(list(fair_means.values())).sum()
        weight_fair = self.hparams.fair_weight
        total = diffusion + weight_fair * fair_total if weight_fair > 0 else diffusion
        return {"loss": total, "diffusion": diffusion, "fair_total": fair_total, "fair": fair_means,
                "diffusion_per_sample": per_sample, "fair_per_sample": fair,
                "decisions": decisions, "records": records, "p_shuffle": probabilities.p_shuffle}

    def training_step(self, batch: dict, batch_idx: int):
        out = self.compute_losses(batch, self.global_step)
        # Every rank must agree to skip: a step is finite only if it is finite on all ranks (a device op).
        finite = self.trainer.strategy.reduce(torch.isfinite(out["loss"].detach()).float(), reduce_op=ReduceOp.MIN)
        self._nonfinite.update(finite)
        logging_step = self._is_logging_step()
        if self._skips_on_device():
            # The fused optimizer reads this flag and leaves weights and moments alone on a non-finite step;
            # the host learns of skipped steps only at logging steps. With gradient accumulation one
            # non-finite micro-batch spoils the accumulated gradient: the flag holds for the whole window.
            optimizer = self.optimizers().optimizer
            bad = 1.0 - finite
            if batch_idx % self.trainer.accumulate_grad_batches and getattr(optimizer, "found_inf", None) is not None:
                bad = torch.maximum(optimizer.found_inf, bad)
            optimizer.found_inf = bad
            if logging_step:
                self._check_nonfinite()
        elif not bool(finite):  # other optimizers: a host sync, and the step is skipped here
            self._check_nonfinite()
            return None
        if logging_step:
            self._log_step(batch, out)
            self.text.report_missing()  # SDXL: shards without micro-conditioning, said once
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=len(batch["key"]))
        return out["loss"]

    def _skips_on_device(self) -> bool:
        optimizer = self.optimizers().optimizer
        return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))

    def _check_nonfinite(self) -> None:
        """Host side of the non-finite bookkeeping: count, warn, and stop a diverged run."""
        skipped, worst = self._nonfinite.collect()
        if skipped:
            self.nonfinite_steps += skipped
            log.warning("non-finite loss: %d step(s) skipped before step %d (%d in this run)", skipped,
                        self.global_step, self.nonfinite_steps)
            self.log("train/nonfinite_skipped", float(self.nonfinite_steps))
        if worst >= self.hparams.max_nonfinite_steps:
            raise TrainingDiverged(
                f"training diverged: {worst} consecutive non-finite steps (max_nonfinite_steps="
                f"{self.hparams.max_nonfinite_steps}) by step {self.global_step}; no adapter was exported. "
                "Lower the learning rate, check the data (fact-data inspect), or resume from an earlier checkpoint")

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this step's logged values to the loggers.

        Lightning's own rule (its logger connector's ``should_update_logs``); values logged on other steps
        would be written at its next logging step, under the wrong step.
        """
        if self._trainer is None:
            return False
        return self.trainer._logger_connector.should_update_logs

    # -- validation: the same numbers for any step, batch position, world size and rank -------------------
    def on_validation_epoch_start(self) -> None:
        self._val_tally = ValidationTally()

    def validation_step(self, batch: dict, batch_idx: int):
        # Draws keyed by (seed, VALIDATION_STEP, sample key) only; the paired face and the caption always.
        out = self.compute_losses(batch, VALIDATION_STEP, validation_probabilities(self.hparams.mask_loss_prob))
        self._val_tally.add(list(batch["key"]), out["diffusion_per_sample"], out["fair_per_sample"])

    def on_validation_epoch_end(self) -> None:
        # Per-sample values gathered from every rank, a sample counted once (a distributed sampler pads with
        # repeats) and summed in key order: the means do not depend on how the set was split.
        self._val_tally.log(self, self.hparams.fair_weight)

    # -- logging ---------------------------------------------------------------------------------------
    def _log_step(self, batch: dict, out: dict) -> None:
        log_step(self, batch, out)

    def gate_values(self) -> dict[str, tuple[float, float]]:
        """tanh of each block's two gates (gathers sharded parameters: call on every rank under FSDP)."""
        return gate_values(self.adapter)

    # -- checkpoints: trainable weights only, strict keys -------------------------------------------------
    def adapter_keys(self) -> set[str]:
        return {ADAPTER_PREFIX + k for k in self.adapter.state_dict()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.adapter is not None:
            self._check_nonfinite()  # skips not yet counted (fused optimizer) go into the checkpoint too
        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
        checkpoint["fact"] = {"version": resume.CHECKPOINT_VERSION, "base": self.base_spec.describe(),
                              "nonfinite_steps": self.nonfinite_steps, "shuffle": asdict(self.shuffle)}
        if self._trainer is not None and self.trainer.optimizers:  # a resume refuses another optimizer class
            schedulers = self.trainer.lr_scheduler_configs
            checkpoint["fact"]["optimizer"] = resume.class_path(self.trainer.optimizers[0])
            checkpoint["fact"]["lr_scheduler"] = resume.class_path(schedulers[0].scheduler) if schedulers else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint and self._trainer is not None and self.trainer.ckpt_path:
            # ModelParallelStrategy (FSDP2) loads a full checkpoint's weights itself, non-strictly, and pops them
            # before this hook: the keys are checked from the file instead.
            checkpoint = {**checkpoint, "state_dict": resume.saved_state_keys(self.trainer.ckpt_path)}
        meta = resume.check_checkpoint(checkpoint, dict(self.hparams), self.adapter_keys(), self.base_spec.describe())
        self._saved_shuffle = meta.get("shuffle")  # compared in on_train_start, once this run's ramp is known
        self.nonfinite_steps = meta.get("nonfinite_steps", 0)

    def full_adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's full CPU state dict (a collective under FSDP; only rank 0 gets the tensors then)."""
        if self.device_mesh is None:
            return {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.adapter, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

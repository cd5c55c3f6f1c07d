"""Previews worth watching: fixed identities, prompts and seeds, with and without the adapter, every N steps.

At fit start :class:`Previews` reads its preview identities once from shards (named identities, or the first
K in shard order; from ``preview_root``, else the held-out ``data.val_root``, else the training data): each
one's first image, i.e. its cached face tokens, its aligned face and its crop. At step 0 (``on_train_start``)
and every ``every_n_steps`` optimizer steps it generates each (identity, prompt, seed) twice, at the inference
adapter scale and at scale 0 (exactly the base model), through the inference generator over the module's own
base (``module.base_model``: SD1.5's pipeline, or SDXL's with its pooled text and time ids), and on global rank 0:

* writes PNG files::

      <trainer.log_dir or default_root_dir>/previews/
          previews.json                                  identities, prompts, seeds and settings
          step-000200/<identity>_p00_s0_adapter.png      identity, prompt index, seed, with the adapter
          step-000200/<identity>_p00_s0_base.png         the same without it
          step-000200/grid.png, scores.json              all previews labelled; face similarities

* logs one labelled grid per identity (``preview/<identity>``; columns: reference face, crop, with the adapter,
  without) to every logger that takes images: a ``TensorBoardLogger``, or any logger with a
  ``log_image(key, images, step=...)`` method (``WandbLogger`` and others); other loggers are skipped;
* logs an identity curve to every logger: ``preview/face_similarity`` (and ``..._base``), the mean cosine
  similarity between the TransFace embedding of the face found in each preview and that of its reference,
  over the previews where a face was found (NaN where none was: TensorBoard draws NaN points as triangles,
  so a missing value shows), and ``preview/face_detect_rate`` (and ``..._base``). ``scores.json`` writes a
  missing similarity as null.

The face model is the project's: the detector under ``LENIENT_POLICY`` and the TransFace encoder that the
shards were made with (the manifest's ``encoder`` record; random weights only when the manifest says the
shards were encoded with random weights). With random tiny models no face is found in any preview: then the
detect rate is 0 and the similarity NaN. When the encoder cannot be loaded (weights missing) the face
scalars are left out with a warning; images are still written.

Under DDP only global rank 0 generates (the other ranks go on to the next step's collectives and wait there);
under FSDP2 (``pl_module.device_mesh`` set, the adapter sharded) every rank generates, since each forward
gathers the adapter's weights, and rank 0 writes and logs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ..data import schema
from ..data.shards import ShardError, iter_raw_samples, read_manifest, shard_urls
from ..faces.identity import face_similarity, reference_embedding
from ..inference.prompts import DEFAULT_SUBJECT, parse_prompts, read_prompts
from ..inference.bases import OWN_SCHEDULER
from ..inference.recipe import DEFAULT_GUIDANCE, DEFAULT_STEPS, INFERENCE_ADAPTER_SCALE
from .preview_grid import labelled_grid, log_images, to_uint8

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = "a photo of {subject}\n"
GRID_TILE = 256  # grids (grid.png, logger images) show previews at most this large; the PNG files are full size
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, eq=False)
class PreviewIdentity:
    """One preview identity: the first image of its first group in the shards."""

    name: str  # the identity as the shards name it
    label: str  # the file-safe name used in file names and tags
    key: str  # the image it came from: "{group key}/{image index:02d}"
    tokens: np.ndarray  # (T, D) float16 cached face-encoder tokens
    face: np.ndarray  # (112, 112, 3) uint8 aligned reference face
    crop: np.ndarray  # (R, R, 3) uint8 training crop


def read_preview_identities(root: str | Path, names: list[str] | None = None, count: int = 4) -> list[PreviewIdentity]:
    """The named identities (in the order given), or the first ``count`` ones in shard order, of a shards folder.

    Reads groups in manifest order and stops once every identity is found; only the chosen images are decoded.
    Raises ValueError naming any identity that is not in the shards.
    """
    root = Path(root)
    wanted = list(dict.fromkeys(names)) if names else None
    found: dict[str, PreviewIdentity] = {}
    labels: set[str] = set()
    for group in _groups(shard_urls(root, read_manifest(root))):
        info, images = schema.split_group(group)
        name = _identity_name(info, images, group["__key__"])
        complete = [i for i, im in enumerate(images) if all(f in im for f in (schema.CROP, schema.FACE, schema.TOKENS))]
        if not complete or name in found or (wanted is not None and name not in wanted):
            continue
        image = images[complete[0]]
        label = _unique(_UNSAFE.sub("_", name).strip("._") or "identity", labels)
        found[name] = PreviewIdentity(name, label, f"{group['__key__']}/{complete[0]:02d}",
                                      np.load(io.BytesIO(image[schema.TOKENS]), allow_pickle=False),
                                      _decode_rgb(image[schema.FACE]), _decode_rgb(image[schema.CROP]))
        if len(found) == (len(wanted) if wanted is not None else count):
            break
    if wanted is not None:
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ValueError(f"preview identities not found in {root}: {missing}")
        return [found[n] for n in wanted]
    if not found:
        raise ValueError(f"no identity with a complete image (crop, face, tokens) in {root}")
    return list(found.values())


def _groups(urls: list[str]):
    """Raw group samples of every shard in order; a shard that cannot be read to its end is skipped with a warning."""
    for url in urls:
        try:
            yield from iter_raw_samples(url)
        except ShardError as err:
            log.warning("previews skip the rest of %s", err)


def _identity_name(info, images: list[dict], key: str) -> str:
    for raw in ([info] if info else []) + [im.get(schema.META) for im in images[:1]]:
        if raw:
            name = json.loads(raw).get("identity")
            if name:
                return str(name)
    return key


def _unique(label: str, taken: set[str]) -> str:
    out, n = label, 1
    while out in taken:
        n += 1
        out = f"{label}-{n}"
    taken.add(out)
    return out


def _decode_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


# -- the callback ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Preview:
    identity: PreviewIdentity
    prompt_index: int
    seed: int
    adapter: np.ndarray  # uint8 (R, R, 3)
    base: np.ndarray

    @property
    def stem(self) -> str:
        return f"{self.identity.label}_p{self.prompt_index:02d}_s{self.seed}"


class Previews(pl.Callback):
    """Fixed-identity, fixed-prompt, fixed-seed previews with and without the adapter (see the module doc).

    Args:
        every_n_steps: preview every this many optimizer steps (and at step 0); 0 turns previews off.
        identities: identity names to preview, as the shards name them; None: the first ``num_identities``.
        num_identities: how many identities to take when ``identities`` is None.
        preview_root: a shards folder to take the identities from; default the data module's ``val_root`` (the
            held-out people) when it has one, else its training shards.
        prompts: the prompts themselves (a list), or a prompt file (``inference.prompts`` format, read when the
            callback is made, so a missing file fails before the run starts); ``{subject}`` is replaced; None:
            one plain prompt.
        subject: what ``{subject}`` becomes.
        seeds: one preview per seed for every identity and prompt.
        inference_steps, guidance, adapter_scale, scheduler: the sampling settings (the official app's);
            ``scheduler`` None is the base's own: PNDM on SD1.5 (the official app's), Euler on SDXL.
        negative_prompt: None for the generator's default (the official one), "" for none.
        resolution: preview size in pixels; default the data module's ``resolution`` (else the crops' size).
        face_similarity: compute and log the identity curve (on global rank 0).
        detector: the face detector backend for the identity curve.
        encoder_weights: TransFace weights for the identity curve, overriding the manifest's path.
        dirpath: where the ``step-NNNNNN`` folders go; default ``<log dir or default_root_dir>/previews``.
    """

    def __init__(self, every_n_steps: int = 500, identities: list[str] | None = None, num_identities: int = 4,
                 preview_root: str | None = None, prompts: str | list[str] | None = None,
                 subject: str = DEFAULT_SUBJECT,
                 seeds: list[int] | None = None, inference_steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, adapter_scale: float = INFERENCE_ADAPTER_SCALE,
                 scheduler: str | None = None,
                 negative_prompt: str | None = None, resolution: int | None = None, face_similarity: bool = True,
                 detector: str = "mediapipe", encoder_weights: str | None = None, dirpath: str | None = None):
        if every_n_steps < 0 or num_identities < 1 or inference_steps < 1:
            raise ValueError("every_n_steps must be >= 0, num_identities and inference_steps >= 1")
        if identities is not None and not identities:
            raise ValueError("identities: give at least one name, or None for the first num_identities")
        self.every_n_steps = every_n_steps
        self.identity_names = list(identities) if identities is not None else None
        self.num_identities = num_identities
        self.preview_root = preview_root
        self.subject = subject
        if isinstance(prompts, str):
            self.prompts = read_prompts(prompts, subject)
        else:
            self.prompts = parse_prompts("\n".join(prompts) if prompts else DEFAULT_PROMPTS, subject)
        self.seeds = list(seeds) if seeds is not None else [0]
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        self.inference_steps = inference_steps
        self.guidance = guidance
        self.adapter_scale = adapter_scale
        self.scheduler = scheduler
        self.negative_prompt = negative_prompt
        self.resolution = resolution
        self.face_similarity = face_similarity
        self.detector_name = detector
        self.encoder_weights = encoder_weights
        self.dirpath = dirpath
        self.identities: list[PreviewIdentity] = []
        self._encoder = None
        self._detector = None
        self._references: dict[str, np.ndarray] = {}
        self._size = 0
        self._last_step: int | None = None
        self.folder: Path | None = None  # set at fit start

    # -- setup ------------------------------------------------------------------------------------------
    def root(self, trainer: pl.Trainer) -> Path:
        """The previews folder. ``trainer.log_dir`` is a collective (a broadcast): call this on every rank."""
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "previews"

    def _data_root(self, trainer: pl.Trainer) -> Path:
        """``preview_root``, else the data module's held-out set (``data.val_root``: the identity curve is then
        measured on people training never saw), else its training shards."""
        if self.preview_root:
            return Path(self.preview_root)
        datamodule = getattr(trainer, "datamodule", None)
        val_root = (getattr(datamodule, "hparams", None) or {}).get("val_root")
        if val_root:
            return Path(val_root)
        root = getattr(datamodule, "root", None)
        if root is None:
            raise ValueError("Previews needs preview_root when the trainer has no FactDataModule")
        return Path(root)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder = self.root(trainer)  # every rank: a broadcast under DDP/FSDP
        if not self._active(trainer, pl_module):
            return
        root = self._data_root(trainer)
        self.identities = read_preview_identities(root, self.identity_names, self.num_identities)
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", {}) or {}
        self._size = self.resolution or hparams.get("resolution") or self.identities[0].crop.shape[0]
        self._last_step = None
        if not trainer.is_global_zero:
            return
        if self.face_similarity:
            self._load_face_model(read_manifest(root).get("encoder") or {}, pl_module.device)
        identities = [{"name": i.name, "label": i.label, "key": i.key} for i in self.identities]
        settings = {"root": str(root), "identities": identities,
                    "prompts": self.prompts, "seeds": self.seeds, "inference_steps": self.inference_steps,
                    "guidance": self.guidance, "adapter_scale": self.adapter_scale,
                    "scheduler": self.scheduler or OWN_SCHEDULER[pl_module.base_spec.base_type],
                    "negative_prompt": self.negative_prompt, "resolution": self._size}
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "previews.json").write_text(json.dumps(settings, indent=1))
        log.info("previews of %d identities x %d prompts x %d seeds every %d steps in %s", len(self.identities),
                 len(self.prompts), len(self.seeds), self.every_n_steps, folder)

    def _load_face_model(self, record: dict, device: torch.device) -> None:
        from ..commands.console import native_noise_filtered
        from ..faces.detectors import start_detector
        from ..interop.official import load_encoder

        weights = self.encoder_weights or record.get("weights")
        try:
            encoder, _ = load_encoder(record.get("variant", "S"), weights,
                                      allow_random=weights is None and bool(record.get("random")))
            with native_noise_filtered():  # the detector's native start-up lines are not the user's business
                self._detector = start_detector(self.detector_name)
        except (FileNotFoundError, ValueError, ImportError) as err:
            log.warning("preview face similarity is off: %s", err)
            return
        self._encoder = encoder.to(device).eval()
        self._references = {i.label: reference_embedding(self._encoder, i.tokens, device) for i in self.identities}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._detector is not None and hasattr(self._detector, "close"):
            self._detector.close()
        self._detector = self._encoder = None

    # -- when -----------------------------------------------------------------------------------------------
    def _active(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Generate here? Rank 0, or every rank when the adapter is sharded (its weights are gathered)."""
        return self.every_n_steps > 0 and (trainer.is_global_zero or pl_module.device_mesh is not None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_preview(trainer, pl_module, force=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._maybe_preview(trainer, pl_module, force=False)

    def _maybe_preview(self, trainer: pl.Trainer, pl_module: pl.LightningModule, force: bool) -> None:
        step = trainer.global_step
        if not self._active(trainer, pl_module) or step == self._last_step or (not force and step % self.every_n_steps):
            return
        self._last_step = step  # gradient accumulation calls this several times per step
        previews = self.generate(pl_module, trainer)
        if trainer.is_global_zero:
            self._publish(trainer, step, previews)

    # -- what -----------------------------------------------------------------------------------------------
    def generate(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> list[_Preview]:
        """Every (identity, prompt, seed) at the adapter scale and at scale 0 (in the training precision), with
        the EMA weights when the trainer has an ``AdapterEMA`` (the raw weights are back afterwards)."""
        from ..inference.generator import FacePortraitGenerator, IdentityCondition
        from .ema import averaged_weights

        module = pl_module
        # The module's own built parts (SD1.5's BaseModel or an SDXLBaseModel): the generator picks the base's
        # pipeline from them, so SDXL previews run SDXL's (both text encoders, pooled text, time ids).
        generator = FacePortraitGenerator.from_components(module.base_model, module.adapter, scheduler=self.scheduler)
        negative = {} if self.negative_prompt is None else {"negative_prompt": self.negative_prompt or None}
        was_training = module.training
        module.eval()
        out = []
        try:
            with averaged_weights(trainer, module), trainer.precision_plugin.forward_context():
                for identity in self.identities:
                    condition = IdentityCondition(torch.from_numpy(identity.tokens.astype(np.float32))[None])
                    for p, prompt in enumerate(self.prompts):
                        for seed in self.seeds:
                            pair = [to_uint8(generator(prompt, condition, **negative, guidance_scale=self.guidance,
                                                       num_inference_steps=self.inference_steps, seed=seed,
                                                       height=self._size, width=self._size, output_type="np",
                                                       adapter_scale=scale)[0])
                                    for scale in (self.adapter_scale, 0.0)]
                            out.append(_Preview(identity, p, seed, *pair))
        finally:
            module.train(was_training)
        return out

    def _publish(self, trainer: pl.Trainer, step: int, previews: list[_Preview]) -> None:
        from PIL import Image

        folder = self.folder / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        scores = self._scores(previews)
        for preview in previews:
            for kind, image in (("adapter", preview.adapter), ("base", preview.base)):
                Image.fromarray(image).save(folder / f"{preview.stem}_{kind}.png")
        columns = ["reference", "crop", f"adapter x{self.adapter_scale:g}", "base"]
        tile = min(self._size, GRID_TILE)
        Image.fromarray(labelled_grid(
            [[p.identity.face, p.identity.crop, p.adapter, p.base] for p in previews],
            [f"{p.identity.label} p{p.prompt_index:02d} s{p.seed}" for p in previews], columns, f"step {step}",
            tile)).save(folder / "grid.png")
        metrics = _summarise(scores)
        written = {k: v if math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no NaN
        (folder / "scores.json").write_text(json.dumps({"step": step, **written, "previews": scores}, indent=1))
        for identity in self.identities:
            mine = [p for p in previews if p.identity is identity]
            grid = labelled_grid([[p.identity.face, p.identity.crop, p.adapter, p.base] for p in mine],
                                 [f"p{p.prompt_index:02d} s{p.seed}" for p in mine], columns,
                                 f"{identity.label}  step {step}", tile)
            log_images(trainer.loggers, f"preview/{identity.label}", [grid], step)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        log.info("wrote %d previews at step %d to %s %s", len(previews), step, folder, metrics)

    def _scores(self, previews: list[_Preview]) -> list[dict]:
        out = []
        for preview in previews:
            entry = {"identity": preview.identity.name, "prompt": preview.prompt_index, "seed": preview.seed}
            if self._encoder is not None:
                reference = self._references[preview.identity.label]
                device = next(self._encoder.parameters()).device
                for kind in ("adapter", "base"):
                    entry[kind] = face_similarity(getattr(preview, kind), reference, self._encoder, self._detector,
                                                  device)
            out.append(entry)
        return out


def _summarise(scores: list[dict]) -> dict[str, float]:
    """The logged scalars: detect rate and mean similarity (over found faces; NaN if none) with and without the
    adapter. None at all when no face model ran."""
    metrics = {}
    for kind, suffix in (("adapter", ""), ("base", "_base")):
        if not scores or kind not in scores[0]:
            continue
        found = [s[kind] for s in scores if s[kind] is not None]
        metrics[f"preview/face_detect_rate{suffix}"] = len(found) / len(scores)
        metrics[f"preview/face_similarity{suffix}"] = float(np.mean(found)) if found else math.nan
    return metrics

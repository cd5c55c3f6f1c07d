"""The options of `fact-data build` and `fact-data add-latents`, declared once: each field carries its default, type and help; the
library takes these dataclasses and ``cli.py`` turns the same fields into the command's parameters.

Kept free of torch so that ``fact-data --help`` starts fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from data_tools.declare import check_fields, option
from data_tools.records import RecordOptions
from data_tools.sources import CAPTION_PLACEHOLDERS, DEFAULT_CAPTION_TEMPLATE
from data_tools.holdout import parse_val_identities
from fact_lightning.checks import SEED, check_template, count, number


@dataclass(frozen=True)
class LatentOptions:
    """Which VAE caches the crops' latent distributions (none: training encodes the crops itself)."""

    vae: str | None = option(None, "Cache each crop's VAE latent mean and std (float16): the SD1.5 base model "
                                   "(folder, hub id or single .safetensors file) or its vae/ folder; tiny or "
                                   "tiny:SEED for the tiny seeded VAE (tests and demos).")
    vae_revision: str | None = option(None, "Hub revision of --vae.")
    vae_batch_size: int = option(8, "VAE batch size (latents are computed in batches of this many, in shard "
                                    "order: keep it to resume or compare runs).", range=count(1, 4096))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.vae is not None and self.vae.startswith("tiny"):
            tiny_seed(self.vae)  # validates tiny / tiny:SEED

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_seed(vae: str) -> int | None:
    """The seed of ``--vae tiny`` (0) or ``tiny:SEED``; None for any other VAE."""
    if vae == "tiny":
        return 0
    if vae.startswith("tiny:") and vae[5:].isdigit():
        return SEED.check(int(vae[5:]), f"the seed of --vae {vae}")
    if vae.startswith("tiny"):
        raise ValueError(f"--vae {vae!r}: write tiny or tiny:SEED")
    return None


@dataclass(frozen=True)
class AddLatentsOptions:
    latents: LatentOptions = option(default_factory=LatentOptions)
    device: str = option("auto", "VAE device: auto, cpu, cuda, cuda:1...")
    resume: bool = option(True, "Keep the shards an interrupted run already finished.")

    def __post_init__(self) -> None:
        if self.latents.vae is None:
            raise ValueError("add-latents needs --vae")


@dataclass(frozen=True)
class BuildOptions:
    src: Path = option(help="Identity folders (src/<identity>/...) or a CSV/JSONL list.")
    out: Path = option(help="Output folder: shards, stats, manifest.json, rejects.jsonl.")
    record: RecordOptions = option(default_factory=RecordOptions)
    detector: str = option("mediapipe", "Face detector backend.", choices=("mediapipe", "facexlib"))
    detector_weights: Path | None = option(None, "Folder with the facexlib weights (detection_Resnet50_Final.pth, "
                                                 "parsing_bisenet.pth).")
    encoder: str = option("S", "TransFace variant.", choices=("S", "B", "L", "tiny"))
    encoder_weights: Path | None = option(None, "Official TransFace file, e.g. ms1mv2_model_TransFace_S.pt.")
    random_encoder: bool = option(False, "Seeded RANDOM encoder weights (tests and demos only).")
    caption_template: str = option(DEFAULT_CAPTION_TEMPLATE, "Caption without a sidecar .txt; {identity} is "
                                                             "replaced.")
    max_per_group: int = option(16, "At most this many images per identity sample.", range=count(1, 10_000))
    images_per_shard: int = option(512, "About this many input photos per shard (identities are never split).",
                                   range=count(1))
    workers: int = option(1, "Worker processes for decoding, detection, masks and crops.", range=count(1, 1024))
    batch_size: int = option(32, "Encoder batch size.", range=count(1, 65_536))
    latents: LatentOptions = option(default_factory=LatentOptions)
    device: str = option("auto", "Encoder device: auto, cpu, cuda, cuda:1...")
    resume: bool = option(True, "Keep the finished shards of an interrupted build.")
    verify_identities: bool = option(False, "Flag images that do not match their identity.")
    drop_mismatched: bool = option(False, "Reject flagged images (needs --verify-identities).")
    identity_model: str = option("auto", "auto: TransFace with real weights, else dlib.",
                                 choices=("auto", "dlib", "transface"))
    identity_threshold: float | None = option(None, "Distance threshold (dlib default 0.6, TransFace cosine 0.6).",
                                              range=number(above=0.0, max=100.0))
    val_identities: str | None = option(None, "Hold out whole identities for validation: a count K (drawn with "
                                              "--val-seed) or comma-separated names. Their photos go to --val-out "
                                              "with its own manifest, never into the training shards.")
    val_seed: int = option(0, "Seed of the draw of --val-identities K (the same seed holds out the same people).",
                           range=SEED)
    val_out: Path | None = option(None, "Folder of the held-out shard set; default <out>/val (training on --out "
                                        "never reads it; give it as data.val_root).")

    def __post_init__(self) -> None:
        check_fields(self)
        check_template(self.caption_template, CAPTION_PLACEHOLDERS, "--caption-template")
        if self.drop_mismatched and not self.verify_identities:
            raise ValueError("drop_mismatched needs verify_identities")
        parse_val_identities(self.val_identities)
        if self.val_out is not None and self.val_identities is None:
            raise ValueError("--val-out needs --val-identities (which identities to hold out)")
        if self.val_identities is not None and Path(self.held_out_folder).resolve() == Path(self.out).resolve():
            raise ValueError("--val-out must be another folder than --out")

    @property
    def held_out_folder(self) -> Path:
        """Where the held-out identities' shards go (``--val-out``, default ``<out>/val``)."""
        return Path(self.val_out) if self.val_out is not None else Path(self.out) / "val"

    def fingerprint(self) -> dict:
        """Options that change shard contents (not paths, workers, device or resume)."""
        return fingerprint(self.to_dict())

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


CONTENT_OPTIONS = ("record", "detector", "encoder", "max_per_group", "verify_identities", "drop_mismatched",
                   "identity_model", "identity_threshold")


def fingerprint(options: dict) -> dict:
    return {k: options.get(k) for k in CONTENT_OPTIONS}

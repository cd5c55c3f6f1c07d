"""The run folder's ``README.md``: a model card rewritten at each adapter export.

:func:`render_card` builds the markdown from plain values (:class:`CardFacts`); :func:`gather_facts` reads
those values from the trainer, the module, the data module's manifest and the run folder; :func:`write_card`
puts the text in place whole. What is not known is written as "unknown", never guessed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ..base_types import LABELS, SD15, SDXL
from ..files import replace_path, staging_name

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
UNKNOWN = "unknown"
TRAIN_KEYS = ("train/loss", "train/diffusion", "train/fair_total", "train/fair")
FAMILIES = {SD15: "Stable Diffusion 1.5", SDXL: "Stable Diffusion XL"}


@dataclass(frozen=True)
class _Loader:
    """How the card's Python lines build a base of one type: the tiny stand-in (its spec's ``describe()`` is
    ``<tiny_name>(<arguments>)``, the builder's own arguments) or the real weights from a folder or hub id."""

    tiny_module: str
    tiny_builder: str
    tiny_name: str
    module: str
    loader: str


LOADERS = {
    SD15: _Loader("fact_lightning.tiny", "tiny_base_model", "tiny", "fact_lightning.models.base", "load_base_model"),
    SDXL: _Loader("fact_lightning.tiny_sdxl", "tiny_sdxl_base_model", "tiny_sdxl", "fact_lightning.models.sdxl_base",
                  "load_sdxl_base_model"),
}


@dataclass(frozen=True)
class CardFacts:
    """What a model card says; paths are relative to the run folder (links that survive moving the run).

    ``data`` holds ``identities``, ``photos``, ``encoder``, ``vae``; ``recipe`` the resolved config's key values,
    in the order they are shown; ``train`` and ``val`` the last logged figures.
    """

    adapter: str
    step: int
    base: str = UNKNOWN
    tiny: bool = False
    base_type: str = SD15  # base_types.SD15 or SDXL: the title, and the base that the load lines build
    init_adapter: str | None = None
    init_adapter_sha256: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    preview: str | None = None
    encoder_variant: str | None = None
    ema: dict[str, Any] | None = None  # the EMA's settings (decay, warmup) when it was on
    ema_adapter: str | None = None  # the EMA weights' file, beside ``adapter``


def _value(value: Any) -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items())
    return str(value)


def _table(rows: dict[str, Any]) -> list[str]:
    if not rows:
        return ["none recorded", ""]
    return ["| | |", "|---|---|", *(f"| {name} | `{_value(value)}` |" for name, value in rows.items()), ""]


def render_card(facts: CardFacts) -> str:
    """The model card's markdown text."""
    init = "none (a fresh adapter)" if not facts.init_adapter else (
        f"`{facts.init_adapter}` (sha256 `{facts.init_adapter_sha256 or UNKNOWN}`)")
    data = {name: facts.data.get(name) for name in ("identities", "photos", "encoder", "vae")}
    lines = [
        "# FACT face adapter",
        "",
        f"A FACT identity adapter for {FAMILIES[facts.base_type]} ({LABELS[facts.base_type]}), trained with "
        f"`fact-train` for {facts.step} steps.",
        "This card is rewritten at each adapter export.",
        "",
        f"- Base model: `{facts.base}`",
        f"- Init adapter: {init}",
        f"- Steps done: {facts.step}",
        f"- Adapter: [`{facts.adapter}`]({facts.adapter})",
        f"- EMA: {_ema_line(facts)}",
        "",
        "## Data",
        "",
        *_table(data),
        "## Recipe",
        "",
        *_table(facts.recipe),
        "## Last figures",
        "",
        "Training (the last logged step):",
        "",
        *_table(facts.train),
        "Validation:",
        "",
        *_table(facts.val),
        "## Newest preview",
        "",
        f"![previews]({facts.preview})" if facts.preview else "none yet",
        "",
        "## Use",
        "",
        "```bash",
        *_generate_lines(facts),
        "```",
        "",
        "```python",
        "from fact_lightning.models.adapter_io import load_adapter",
        *_base_lines(facts),
        f"adapter = load_adapter({facts.adapter!r}, base.unet)  # attached; condition with adapter.condition(...)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _ema_line(facts: CardFacts) -> str:
    if facts.ema is None:
        return "off (no averaged weights)"
    warmup = ", warmed up as min(decay, (1 + n) / (10 + n))" if facts.ema.get("warmup") else ""
    where = f": [`{facts.ema_adapter}`]({facts.ema_adapter})" if facts.ema_adapter else ""
    return f"on (decay {_value(facts.ema.get('decay'))}{warmup}){where}"


def _base_lines(facts: CardFacts) -> list[str]:
    """The Python lines that build the base model ``base``: the tiny stand-in of the card's seed, or the real
    weights of its type from the folder or hub id it names."""
    how = LOADERS[facts.base_type]
    if facts.tiny:
        arguments = facts.base.removeprefix(how.tiny_name)  # "(seed=0, ...)": the builder takes the same
        return [f"from {how.tiny_module} import {how.tiny_builder}", "", f"base = {how.tiny_builder}{arguments}"]
    return [f"from {how.module} import {how.loader}", "", f"base = {how.loader}({facts.base!r})"]


def _generate_lines(facts: CardFacts) -> list[str]:
    weights = ["--tiny"] if facts.tiny else [f"--base {facts.base}"]
    if facts.base_type != SD15:  # the tiny stand-in to build; with real weights it says what the folder holds
        weights.append(f"--base-type {facts.base_type}")
    variant = facts.encoder_variant
    if not facts.tiny:
        if variant in ("S", "B", "L"):
            weights.append(f"--face-encoder ms1mv2_model_TransFace_{variant}.pt --face-encoder-variant {variant}")
        else:
            weights.append("--face-encoder FILE")
    return [f"fact-generate {' '.join(weights)} --adapter {facts.adapter} \\",
            '  --reference me1.jpg --prompt "a portrait photo of {subject}" --subject "a person" --out out/generate']


# --- gathered from a fit ------------------------------------------------------------------------------------
def _manifest(datamodule: Any) -> dict | None:
    manifest = getattr(datamodule, "manifest", None)
    if isinstance(manifest, dict):
        return manifest
    root = (getattr(datamodule, "hparams", None) or {}).get("root")
    if root is None:
        return None
    from ..data.shards import read_manifest

    try:
        return read_manifest(root)
    except Exception as err:  # the card says "unknown" rather than failing an export
        log.warning("the model card cannot read the data manifest: %s", err)
        return None


def data_facts(manifest: dict | None) -> dict[str, Any]:
    """Identities, photos, encoder and VAE as the shards' manifest records them (None where it does not)."""
    if not manifest:
        return {}
    counts = manifest.get("counts") or {}
    encoder = manifest.get("encoder") or {}
    vae = manifest.get("vae")
    identities = counts.get("identities")
    if identities is None and isinstance(manifest.get("identities"), dict):
        identities = len(manifest["identities"])
    name = encoder.get("variant")
    if name and encoder.get("random"):
        name += " (random weights)"
    return {"identities": identities, "photos": counts.get("images"), "encoder": name,
            "vae": vae.get("name") if isinstance(vae, dict) else "none (latents computed in training)"}


def _metrics(trainer: pl.Trainer, keys) -> dict[str, float]:
    found = {}
    for key in keys:
        value = trainer.callback_metrics.get(key)
        if value is not None:
            try:
                found[key] = float(value)
            except (TypeError, ValueError):
                pass
    return found


def _newest_preview(run: Path) -> str | None:
    grids = sorted((run / "previews").glob("step-*/grid.png"))
    return grids[-1].relative_to(run).as_posix() if grids else None


def gather_facts(trainer: pl.Trainer, pl_module: pl.LightningModule, run: Path, adapter: Path,
                 ema_adapter: Path | None = None) -> CardFacts:
    """The card's values for a fit at its current step, ``adapter`` being the file just exported (and
    ``ema_adapter`` its EMA beside it)."""
    from ..training.base_spec import TinyBase, TinySDXLBase
    from .ema import find_ema

    hp = pl_module.hparams
    data = getattr(trainer, "datamodule", None)
    manifest = _manifest(data)
    batch = (getattr(data, "hparams", None) or {}).get("batch_size")
    accumulate = trainer.accumulate_grad_batches
    recipe = {
        "projection": hp.get("projection"),
        "fair_weight": hp.get("fair_weight"),
        "shuffle": hp.get("shuffle"),
        "face_drop": hp.get("face_drop"),
        "text_drop": hp.get("text_drop"),
        "adapter_scale": hp.get("adapter_scale"),
        "adapter_dtype": hp.get("adapter_dtype"),
        "max_steps": trainer.max_steps,
        "precision": trainer.precision,
        "batch_size": batch,
        "world_size": trainer.world_size,
        "accumulate_grad_batches": accumulate,
        "global_batch": batch * trainer.world_size * accumulate if batch else None,
    }
    if trainer.optimizers:
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0] if optimizer.param_groups else {}
        recipe["optimizer"] = type(optimizer).__name__
        recipe["lr"] = group.get("initial_lr", group.get("lr"))
    spec = pl_module.base_spec
    ema = find_ema(trainer)
    return CardFacts(
        adapter=Path(os.path.relpath(adapter, run)).as_posix(),
        step=trainer.global_step,
        base=spec.describe(),
        tiny=isinstance(spec, (TinyBase, TinySDXLBase)),
        base_type=spec.base_type,
        init_adapter=hp.get("init_adapter"),
        init_adapter_sha256=hp.get("init_adapter_sha256"),
        data=data_facts(manifest),
        recipe=recipe,
        train=_metrics(trainer, TRAIN_KEYS),
        val=_metrics(trainer, sorted(k for k in trainer.callback_metrics if k.startswith("val/"))),
        preview=_newest_preview(run),
        encoder_variant=((manifest or {}).get("encoder") or {}).get("variant"),
        ema=ema.settings() if ema is not None else None,
        ema_adapter=Path(os.path.relpath(ema_adapter, run)).as_posix() if ema_adapter else None,
    )


def write_card(run: Path, text: str) -> Path:
    """``run/README.md``, written to a hidden staging file beside it and renamed over it: a full disk leaves the
    old card and no temporary file; a kill leaves a ``.README.md.tmp-<pid>`` that ``remove_staging`` clears."""
    path = Path(run) / CARD_NAME
    staged = staging_name(path)
    try:
        _write_file(staged, text.encode("utf-8"))
        replace_path(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return path


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

"""`fact-data build` orchestration: discover inputs, plan shards (``plan.py``), build each shard
(``shard_builder.py``: photos, faces, identities, latents), write rejects and the manifest (``shards.py``).
With ``--val-identities`` the held-out identities (``holdout.py``) become a second shard set, built the same
way in its own folder with its own manifest.

Determinism: inputs are sorted and planned into shards by identity before any work; every record depends
only on its own file and the options; features are computed per shard in fixed batches. So output is
independent of ``workers``, and a resumed build, which keeps every shard whose stats (written last) match
the plan and whose bytes match their sha256, ends with the same shards as a clean one.

Safety: one build at a time per output folder (a lock); a shard is removed before it is rewritten and the
old manifest.json stays until the new one replaces it, so a reader of a half-rebuilt folder gets a clear
error, never a mix that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from data_tools import stats
from data_tools.holdout import Split, choose_held_out, parse_val_identities, split_discovery
from data_tools.options import CONTENT_OPTIONS, BuildOptions, fingerprint
from data_tools.output import clean_tmp, locked_output, os_errors
from data_tools.plan import plan_shards
from data_tools.sources import Discovery, discover
from fact_lightning.data import schema, shards
from fact_lightning.errors import UserError

logger = logging.getLogger(__name__)
__all__ = ["BuildOptions", "run_build"]

ProgressFn = Callable[[int], None]


# --- the output folder -------------------------------------------------------------------------------
def _remove_extra_shards(out: Path, planned: int) -> None:
    """Shard files beyond the plan (an earlier, larger build): removed once the new manifest is in place."""
    keep = {shards.shard_name(i) for i in range(planned)} | {shards.stats_name(i) for i in range(planned)}
    for path in out.iterdir():
        if shards.SHARD_FILE_RE.match(path.name) and path.name not in keep:
            logger.info("removing %s (not part of this build)", path)
            path.unlink()


def _previous_manifest(out: Path) -> dict | None:
    try:
        return shards.read_manifest(out)
    except shards.ManifestError:
        return None


def _report_changes(out: Path, previous: dict | None, opts: BuildOptions, encoder: dict, vae: dict | None) -> None:
    if previous is None:
        return
    old, new = fingerprint(previous.get("options") or {}), opts.fingerprint()
    changed = [k for k in CONTENT_OPTIONS if old.get(k) != new.get(k)]
    old_enc = previous.get("encoder") or {}
    if old_enc.get("weights_sha256") != encoder.get("weights_sha256") or old_enc.get("variant") != encoder["variant"]:
        changed.append("encoder weights")
    if previous.get("vae") != vae:
        changed.append("cached latents (--vae)")
    if changed:
        logger.warning("options changed since the build in %s (%s): its shards will be rebuilt; the old %s stays "
                       "until the new build completes", out, ", ".join(changed), shards.MANIFEST_NAME)


def _discover(opts: BuildOptions) -> Discovery:
    if not Path(opts.src).exists():
        raise UserError(f"--src not found: {opts.src}")
    found = discover(opts.src, opts.caption_template)
    if not found.items:
        reasons = sorted({s.reason for s in found.skipped})
        detail = f" ({found.found} found and skipped: {', '.join(reasons)})" if found.skipped else ""
        raise UserError(f"no usable photos in {opts.src}{detail}: put each person's photos in a folder "
                        f"src/<identity>/ or list them in a CSV/JSONL file")
    return found


def run_build(opts: BuildOptions, progress: ProgressFn | None = None,
              on_plan: Callable[[int, int], None] | None = None) -> dict:
    """Build the dataset in ``opts.out``; returns the manifest (also written to manifest.json, last).

    With ``--val-identities`` the held-out identities' inputs are built the same way into their own folder
    (``opts.held_out_folder``, its own manifest), never into ``opts.out``; the returned manifest is the
    training set's, and its ``split`` names the held-out set."""
    progress = progress or (lambda n: None)
    out = Path(opts.out)
    found = _discover(opts)
    split = None
    wanted = parse_val_identities(opts.val_identities)
    if wanted is not None:
        held_out = choose_held_out([i.identity for i in found.items], wanted, opts.val_seed)
        split = split_discovery(found, held_out)
    from data_tools.shard_builder import ShardBuilder  # torch and the encoder: only once the inputs are there

    with contextlib.ExitStack() as held:
        held.enter_context(locked_output(out))
        if split is not None:
            held.enter_context(locked_output(opts.held_out_folder))
        builder = ShardBuilder(opts, progress)
        salt = {"options": opts.fingerprint(),
                "encoder": {k: builder.encoder[k] for k in ("variant", "weights_sha256", "random")}}
        sets = [(out, split.train if split else found, _split_record(opts, split, "train"))]
        if split is not None:
            sets.append((opts.held_out_folder, split.val, _split_record(opts, split, "val")))
        plans = [plan_shards(part.items, opts.images_per_shard, salt) for _, part, _ in sets]
        if on_plan:
            on_plan(found.found, sum(len(plan) for plan in plans))
        try:
            manifests = [_build_set(folder, part, plan, record, opts, builder, progress)
                         for (folder, part, record), plan in zip(sets, plans)]
        finally:
            builder.close()
    return manifests[0]


def _split_record(opts: BuildOptions, split: Split | None, role: str) -> dict | None:
    """The manifest's ``split``: which identities were held out and where each set is."""
    if split is None:
        return None
    record = {"role": role, "held_out": split.held_out, "val_identities": opts.val_identities,
              "val_seed": opts.val_seed, "train": str(opts.out), "val": str(opts.held_out_folder)}
    return record


def _warn_stale_held_out(out: Path, previous: dict | None, split: dict | None) -> None:
    """A build without held-out identities after one with: the old held-out set now overlaps the training set."""
    old = (previous or {}).get("split") or {}
    if split is None and old.get("role") == "train" and Path(old.get("val", "")).is_dir():
        logger.warning("the held-out set %s of the previous build holds identities that are now in the training "
                       "shards of %s: remove it, or build with --val-identities again", old["val"], out)


def _build_set(out: Path, found: Discovery, plan: list, split: dict | None, opts: BuildOptions, builder,
               progress: ProgressFn) -> dict:
    """One shard set (the training set, or the held-out one) in ``out``: resume, build, rejects, manifest."""
    builder.out = out
    previous = _previous_manifest(out)
    _report_changes(out, previous, opts, builder.encoder, builder.vae_info)
    if split is None or split["role"] == "train":
        _warn_stale_held_out(out, previous, split)
    with os_errors(f"cannot write to --out {out}"):
        clean_tmp(out)
    all_stats, resumed = [], 0
    for shard in plan:
        done = (stats.load_finished(out, shard.index, shard.plan_hash, builder.vae_info)
                if opts.resume else None)
        if done is not None:
            resumed += 1
            progress(len(shard.items))
            logger.info("resume: %s already complete", done["name"])
        else:
            shards.remove_shard(out, shard.index)  # the old manifest now fails loudly, not silently
            done = builder.process_shard(shard)
        all_stats.append(done)
    progress(len(found.skipped))
    summary = stats.summarize(all_stats, [asdict(s) for s in found.skipped])
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "tool": {"name": "fact-data", "version": _version()},
        "options": opts.to_dict(),
        "encoder": builder.encoder,
        "vae": builder.vae_info,
        "detector": {"name": opts.detector,
                     "weights": str(opts.detector_weights) if opts.detector_weights else None},
        **{k: v for k, v in summary.items() if k != "rejects"},
        "warnings": builder.warnings,
        "resumed_shards": resumed,
    }
    if split is not None:
        manifest["split"] = split
    with os_errors(f"cannot write to --out {out}"):
        shards.write_rejects(out, summary["rejects"])
        shards.write_manifest(out, manifest)
        _remove_extra_shards(out, len(plan))
    return manifest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fact-lightning")
    except PackageNotFoundError:
        return "unknown"

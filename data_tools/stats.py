"""Run bookkeeping: which finished shards a resume keeps, and the manifest's counts over all shards' stats."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from fact_lightning.data import schema, shards
from fact_lightning.files import sha256_file

logger = logging.getLogger(__name__)


def load_finished(out: Path, index: int, plan_hash: str, vae: dict | None = None) -> dict | None:
    """The stats of a shard finished by an earlier run with the same plan, the same cached latents (``vae``,
    ``manifest["vae"]``: None for none) and intact bytes, else None."""
    stats, tar = shards.read_stats(out, index), Path(out) / shards.shard_name(index)
    if stats is None or not tar.is_file():
        return None
    if stats.get("plan_hash") != plan_hash or stats.get("format_version") != schema.FORMAT_VERSION:
        return None
    if stats.get("vae") != vae:  # other cached latents (or none where some are asked for)
        return None
    if tar.stat().st_size != stats.get("tar_bytes") or sha256_file(tar) != stats.get("sha256"):
        logger.warning("%s does not match its stats (size or sha256): the shard will be rebuilt", tar)
        return None
    return stats


def summarize(shard_stats: list[dict], skipped: list[dict]) -> dict:
    """Counts, per-identity counts, shard list and reject reasons over all shards' stats and the inputs
    that discovery skipped."""
    rejects = skipped + [r for s in shard_stats for r in s["rejects"]]
    identities: dict[str, dict] = {}
    for s in shard_stats:
        for name, c in s["identities"].items():
            identities[name] = dict(c)
    for r in skipped:  # files of an identity folder that discovery rejected count in its row too
        if r["identity"]:
            identities.setdefault(r["identity"], {"found": 0, "accepted": 0, "groups": 0})["found"] += 1
    found = sum(s["found"] for s in shard_stats) + len(skipped)
    accepted = sum(s["images"] for s in shard_stats)
    if accepted + len(rejects) != found:  # every file found is accepted or rejected with a reason: else a bug
        raise RuntimeError(f"accounting error: {found} files found, {accepted} accepted + {len(rejects)} rejected")
    return {
        "counts": {"found": found, "accepted": accepted, "rejected": len(rejects),
                   "samples": sum(s["samples"] for s in shard_stats), "images": accepted,
                   "identities": sum(1 for c in identities.values() if c["accepted"])},
        "identities": dict(sorted(identities.items())),
        "shards": [shards.shard_entry(s) for s in shard_stats if s["samples"]],
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejects": rejects,
    }

"""Run bookkeeping: per-shard stats (written last: the resume marker), manifest.json, rejects.jsonl."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from fact_lightning.data import schema

logger = logging.getLogger(__name__)


def write_json_atomic(path: Path, obj, indent: int | None = 2) -> None:
    """Write JSON to a temporary file, fsync it and swap it in with os.replace."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(index: int) -> str:
    return schema.SHARD_PATTERN.format(index=index)


def stats_path(out: Path, index: int) -> Path:
    return Path(out) / (shard_name(index)[: -len(".tar")] + schema.STATS_SUFFIX)


def load_finished(out: Path, index: int, plan_hash: str) -> dict | None:
    """The stats of a shard finished by an earlier run with the same plan, else None."""
    spath, tpath = stats_path(out, index), Path(out) / shard_name(index)
    if not spath.is_file() or not tpath.is_file():
        return None
    try:
        stats = json.loads(spath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("unreadable stats %s: shard will be rebuilt", spath)
        return None
    if stats.get("plan_hash") != plan_hash or stats.get("format_version") != schema.FORMAT_VERSION:
        return None
    if tpath.stat().st_size != stats.get("tar_bytes"):
        logger.warning("%s has an unexpected size: shard will be rebuilt", tpath)
        return None
    return stats


def write_rejects(out: Path, rejects: list[dict]) -> None:
    path = Path(out) / schema.REJECTS_NAME
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def summarize(shard_stats: list[dict], orphans: list[dict]) -> dict:
    """Counts, per-identity counts, shard list and reject reasons over all shards' stats."""
    rejects = orphans + [r for s in shard_stats for r in s["rejects"]]
    identities: dict[str, dict] = {}
    for s in shard_stats:
        for name, c in s["identities"].items():
            identities[name] = c
    found = sum(s["found"] for s in shard_stats) + len(orphans)
    accepted = sum(s["images"] for s in shard_stats)
    return {
        "counts": {"found": found, "accepted": accepted, "rejected": len(rejects),
                   "samples": sum(s["samples"] for s in shard_stats), "images": accepted,
                   "identities": sum(1 for c in identities.values() if c["accepted"])},
        "identities": dict(sorted(identities.items())),
        "shards": [{"name": s["name"], "samples": s["samples"], "images": s["images"], "sha256": s["sha256"]}
                   for s in shard_stats if s["samples"]],
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejects": rejects,
    }

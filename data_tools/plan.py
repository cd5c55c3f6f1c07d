"""Planning a build before any work: inputs grouped by identity, identities packed into shards, and each
shard's hash (inputs, options and encoder) that resume compares with the stats of a finished shard.

An identity never spans two shards; the plan depends only on the sorted inputs, so it is the same for any
number of workers and on every resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from data_tools.sources import SourceItem
from fact_lightning.data import schema, shards


@dataclass(frozen=True)
class IdentityPlan:
    name: str
    items: tuple[SourceItem, ...]


@dataclass(frozen=True)
class ShardPlan:
    index: int
    identities: tuple[IdentityPlan, ...]  # sorted by name; their items in input order
    plan_hash: str = ""

    @property
    def name(self) -> str:
        return shards.shard_name(self.index)

    @property
    def items(self) -> list[SourceItem]:
        return [item for ident in self.identities for item in ident.items]


def by_identity(items: list[SourceItem]) -> list[IdentityPlan]:
    """Items grouped by identity, identities sorted by name."""
    groups: dict[str, list[SourceItem]] = {}
    for item in items:
        groups.setdefault(item.identity, []).append(item)
    return [IdentityPlan(name, tuple(groups[name])) for name in sorted(groups)]


def plan_shards(items: list[SourceItem], images_per_shard: int, salt: dict | None = None) -> list[ShardPlan]:
    """Consecutive identities packed into shards of about ``images_per_shard`` inputs each; ``salt`` (the
    options and encoder that change contents) goes into each shard's plan hash."""
    packed: list[list[IdentityPlan]] = []
    current: list[IdentityPlan] = []
    size = 0
    for ident in by_identity(items):
        if current and size + len(ident.items) > images_per_shard:
            packed.append(current)
            current, size = [], 0
        current.append(ident)
        size += len(ident.items)
    if current:
        packed.append(current)
    plans = [ShardPlan(i, tuple(group)) for i, group in enumerate(packed)]
    return [ShardPlan(p.index, p.identities, plan_hash(p, salt or {})) for p in plans]


def plan_hash(plan: ShardPlan, salt: dict) -> str:
    payload = {"format_version": schema.FORMAT_VERSION, **salt, "items": [i.fingerprint() for i in plan.items]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def split_groups(n: int, max_per_group: int) -> list[range]:
    """Index ranges of ceil(n / max) near-equal groups."""
    k = max(1, -(-n // max_per_group))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [range(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]

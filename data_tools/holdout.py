"""Held-out identities (`fact-data build --val-identities`): which people go to the validation shard set.

Whole identities are held out, so validation measures the adapter on faces it never trained on. The choice
depends only on the identity names found and the option (a count drawn with ``--val-seed``, or the names
themselves), never on file order or workers: a resumed or repeated build holds out the same people.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_tools.sources import Discovery
from fact_lightning.errors import UserError


def parse_val_identities(value: str | None) -> int | tuple[str, ...] | None:
    """``--val-identities``: None, a count K >= 1, or a comma-separated list of distinct names."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        k = int(text)
        if k < 1:
            raise ValueError(f"--val-identities {value!r}: hold out at least 1 identity, or leave the option out")
        return k
    names = [n.strip() for n in text.split(",")]
    if not text or any(not n for n in names):
        raise ValueError(f"--val-identities {value!r}: give a count or comma-separated identity names, none empty")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--val-identities names an identity twice: {', '.join(repeated)}")
    return tuple(names)


def choose_held_out(identities: list[str], wanted: int | tuple[str, ...], seed: int) -> list[str]:
    """The held-out identity names, sorted. ``identities``: the names with usable photos. At least one identity
    stays for training; an unknown name is an error naming it."""
    pool = sorted(set(identities))
    if isinstance(wanted, int):
        if wanted >= len(pool):
            raise UserError(f"--val-identities {wanted}: the inputs have {len(pool)} identities with usable photos; "
                            f"hold out fewer than {len(pool)} so that some remain for training")
        return sorted(random.Random(seed).sample(pool, wanted))
    unknown = [n for n in wanted if n not in pool]
    if unknown:
        raise UserError(f"--val-identities: no usable photos of {', '.join(repr(n) for n in unknown)} in the inputs "
                        f"(identities found: {_some(pool)})")
    if len(wanted) >= len(pool):
        raise UserError(f"--val-identities names all {len(pool)} identities of the inputs: leave some for training")
    return sorted(wanted)


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class Split:
    train: Discovery
    val: Discovery
    held_out: list[str]


def split_discovery(found: Discovery, held_out: list[str]) -> Split:
    """Inputs (and the inputs discovery skipped) of the held-out identities apart from the rest."""
    out = set(held_out)
    return Split(train=Discovery([i for i in found.items if i.identity not in out],
                                 [s for s in found.skipped if s.identity not in out]),
                 val=Discovery([i for i in found.items if i.identity in out],
                               [s for s in found.skipped if s.identity in out]),
                 held_out=list(held_out))

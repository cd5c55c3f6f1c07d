"""Options declared once: a dataclass field carries its default, its help text and how the command line
spells it; the library takes the dataclass, and ``cli.py`` turns the same fields into the command's
parameters. Nothing else restates a default."""

from __future__ import annotations

import dataclasses
from typing import Any

_REQUIRED = dataclasses.MISSING


def option(default: Any = _REQUIRED, help: str = "", *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, default_factory: Any = _REQUIRED, cli: bool = True) -> Any:
    """A dataclass field with command-line metadata.

    help: the one-line help; choices: allowed strings; flag: the option's spelling if not ``--field-name``;
    cli: False keeps the field out of the command line (library-only settings).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "cli": cli}
    if default_factory is not _REQUIRED:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(obj: Any) -> None:
    """Raise ValueError for a field whose value is not one of its declared choices."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ValueError(f"{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                             f"got {getattr(obj, f.name)!r}")

"""Options declared once: a dataclass field carries its default, its help text and how the command line
spells it; the library takes the dataclass, and ``cli.py`` turns the same fields into the command's
parameters. Nothing else restates a default.

A number carries its :class:`~fact_lightning.checks.Range` (``option(range=...)``): the command line parses
through it and :func:`check_fields` applies it again to a dataclass built in Python. ``cli.py`` refuses a
numeric field without one, so a new option cannot skip the check."""

from __future__ import annotations

import dataclasses
from typing import Any

from fact_lightning.checks import Range

_REQUIRED = dataclasses.MISSING


def option(default: Any = _REQUIRED, help: str = "", *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, default_factory: Any = _REQUIRED, cli: bool = True,
           range: Range | None = None) -> Any:
    """A dataclass field with command-line metadata.

    help: the one-line help; choices: allowed strings; flag: the option's spelling if not ``--field-name``;
    cli: False keeps the field out of the command line (library-only settings); range: a number's range.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "cli": cli, "range": range}
    if default_factory is not _REQUIRED:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_fields(obj: Any) -> None:
    """Raise ValueError naming the option for a value outside its choices or its range."""
    check_choices(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("range") is not None and value is not None:
            f.metadata["range"].check(value, flag_name(f))


def check_choices(obj: Any) -> None:
    """Raise ValueError for a field whose value is not one of its declared choices."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ValueError(f"{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                             f"got {getattr(obj, f.name)!r}")

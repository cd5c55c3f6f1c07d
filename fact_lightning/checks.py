"""Values checked at the door: every number an option or a config takes is finite and within its declared
range, and every text template names only the placeholders it may.

A :class:`Range` is declared once beside its option (``parser=`` of a Typer option in
``fact_lightning.commands.options``, ``option(range=...)`` in ``data_tools``, an ``__init__`` argument of
the data module); the command line parses through it and the dataclasses check their fields with it again,
so a value from Python meets the same rule. A bad value is a ``ValueError`` that names the option: the
console scripts turn it into one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import math
import numbers
import string
from dataclasses import dataclass
from typing import Any

_INT64 = 2**63  # ints outside int64 are out of range everywhere: torch, numpy and C libraries take int64


@dataclass(frozen=True)
class Range:
    """An int or a finite float within [min, max] (``min_open``: min itself excluded; ``multiple_of``: ints only).

    Called with a command-line string (or a default) it returns the parsed, checked number; it is the
    ``parser`` of every numeric option.
    """

    kind: type = float
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    multiple_of: int | None = None

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.multiple_of:
            what = f"a multiple of {self.multiple_of}"
        low, high = _text(self.min), _text(self.max)
        if self.min is not None and self.max is not None:
            return f"{what} in {'(' if self.min_open else '['}{low}, {high}]"
        if self.min is not None:
            return f"{what} {'>' if self.min_open else '>='} {low}"
        if self.max is not None:
            return f"{what} <= {high}"
        return what

    def __call__(self, value: Any) -> int | float:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text, 10) if self.kind is int else float(text)
            except ValueError:
                raise ValueError(f"must be {self.describe()}, got {value!r}") from None
        return self.check(value)

    def check(self, value: Any, name: str = "") -> int | float:
        """``value`` if it is in range, else ValueError: '``name`` must be ..., got ...'."""
        prefix = f"{name} " if name else ""
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:  # numpy scalars as Python numbers
            value = int(value) if isinstance(value, numbers.Integral) else float(value)
        if ok and isinstance(value, float):
            ok = math.isfinite(value)
            if ok and self.kind is int:  # 4.0 (a YAML file's) is 4; 4.5 is no count
                ok, value = value.is_integer(), int(value) if value.is_integer() else value
        elif ok:
            ok = -_INT64 <= value < _INT64
        if ok and self.min is not None:
            ok = value > self.min if self.min_open else value >= self.min
        if ok and self.max is not None:
            ok = value <= self.max
        if ok and self.multiple_of:
            ok = value % self.multiple_of == 0
        if not ok:
            raise ValueError(f"{prefix}must be {self.describe()}, got {value!r}")
        return value if self.kind is int else float(value)


def _text(bound: float | None) -> str:
    return "" if bound is None else str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def count(min: int = 1, max: int | None = None) -> Range:
    """An integer count, at least ``min`` (1 by default)."""
    return Range(int, min, max)


def number(min: float | None = None, max: float | None = None, *, above: float | None = None) -> Range:
    """A finite float within [min, max]; ``above``: strictly greater than it."""
    if above is not None:
        return Range(float, above, max, min_open=True)
    return Range(float, min, max)


FRACTION = Range(float, 0.0, 1.0)            # [0, 1]
SEED = Range(int, 0, 2**32 - 1)              # numpy's and torch's seeds alike
PIXELS = Range(int, 8, 8192, multiple_of=8)  # an image side the VAE can halve three times


def template_fields(text: str) -> list[str]:
    """The placeholder names of a ``str.format`` template; ValueError for unbalanced braces."""
    return [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]


def check_template(text: str, allowed: tuple[str, ...], what: str) -> str:
    """``text`` if every ``{placeholder}`` in it is one of ``allowed``, else ValueError naming ``what``."""
    known = ", ".join("{" + name + "}" for name in allowed)
    try:
        fields = template_fields(text)
    except ValueError as err:
        raise ValueError(f"{what}: {err} in {text!r} (placeholders: {known}; write {{{{ or }}}} for a brace)") from None
    for field in fields:
        if field not in allowed:
            raise ValueError(f"{what}: unknown placeholder {{{field}}} in {text!r} (placeholders: {known}; "
                             "write {{ or }} for a brace)")
    return text

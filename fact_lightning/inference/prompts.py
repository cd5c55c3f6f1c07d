"""Prompt lists: one prompt per line; blank lines and ``#`` comments skipped; ``{subject}`` is replaced.

``{subject}`` is the one placeholder: any other (``{subjet}``, ``{0}``) or a lone brace is an error naming
the file and line, not a prompt sent as written. ``{{`` and ``}}`` stand for a brace.
The shipped example is ``configs/prompts/example.txt``; point at your own file the same way.
"""

from __future__ import annotations

from pathlib import Path

from fact_lightning.checks import check_template

DEFAULT_SUBJECT = "a person"
PLACEHOLDERS = ("subject",)


def fill(template: str, subject: str = DEFAULT_SUBJECT, where: str = "--prompt") -> str:
    """``template`` with ``{subject}`` replaced; ValueError naming ``where`` for any other placeholder."""
    return check_template(template, PLACEHOLDERS, where).format(subject=subject)


def parse_prompts(text: str, subject: str = DEFAULT_SUBJECT, source: str = "prompt file") -> list[str]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(fill(line, subject, f"{source}:{n}"))
    return prompts


def read_prompts(path: str | Path, subject: str = DEFAULT_SUBJECT) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = parse_prompts(text, subject, str(path))
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; '#' starts a comment)")
    return prompts

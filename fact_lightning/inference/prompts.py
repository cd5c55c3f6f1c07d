"""Prompt lists: one prompt per line; blank lines and ``#`` comments skipped; ``{subject}`` is replaced.

The shipped example is ``configs/prompts/example.txt``; point at your own file the same way.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_SUBJECT = "a person"


def parse_prompts(text: str, subject: str = DEFAULT_SUBJECT) -> list[str]:
    prompts = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line.replace("{subject}", subject))
    return prompts


def read_prompts(path: str | Path, subject: str = DEFAULT_SUBJECT) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = parse_prompts(path.read_text(encoding="utf-8"), subject)
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; '#' starts a comment)")
    return prompts

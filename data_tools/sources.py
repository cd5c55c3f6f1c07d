"""Input discovery: an identity-folder tree or a CSV/JSONL manifest -> sorted list of SourceItem.

Folder layout: ``src/<identity>/**/<image>``; a caption comes from a sidecar ``<image>.txt`` (either
``photo.txt`` or ``photo.jpg.txt``), else from the caption template. Files with an image extension
directly under ``src/`` have no identity: they are returned as orphans so the build can reject them.
Manifest: CSV with a header (``path,identity[,caption]``) or JSONL with those keys; relative paths are
resolved against the manifest's folder.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
DEFAULT_CAPTION_TEMPLATE = "a photo of a person"


@dataclass(frozen=True, order=True)
class SourceItem:
    identity: str
    source: str  # stable name recorded in the output (relative path or as given in the manifest)
    path: str    # absolute path to read
    caption: str

    def fingerprint(self) -> list:
        """Cheap change detector for resume: name, size and modification time of the file."""
        try:
            st = Path(self.path).stat()
            return [self.source, self.identity, self.caption, st.st_size, st.st_mtime_ns]
        except OSError:
            return [self.source, self.identity, self.caption, None, None]


def render_caption(template: str, identity: str) -> str:
    return template.format(identity=identity)


def _sidecar_caption(path: Path) -> str | None:
    for candidate in (path.with_suffix(".txt"), path.with_name(path.name + ".txt")):
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text
    return None


def scan_folder(root: Path, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> tuple[list[SourceItem], list[SourceItem]]:
    """(items, orphans) of an identity-folder tree, each sorted; orphans have an empty identity."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder not found: {root}")
    items, orphans = [], []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        rel = path.relative_to(root)
        identity = rel.parts[0] if len(rel.parts) > 1 else ""
        caption = _sidecar_caption(path) or render_caption(caption_template, identity)
        item = SourceItem(identity, rel.as_posix(), str(path.resolve()), caption)
        (items if identity else orphans).append(item)
    return sorted(items), sorted(orphans)


def _manifest_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        return rows
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"manifest must be .csv or .jsonl: {path}")


def read_manifest(path: Path, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> list[SourceItem]:
    """Items of a CSV/JSONL manifest with keys path, identity and optional caption, sorted."""
    path = Path(path)
    items = []
    for n, row in enumerate(_manifest_rows(path), 1):
        src, identity = str(row.get("path") or "").strip(), str(row.get("identity") or "").strip()
        if not src or not identity:
            raise ValueError(f"{path}: row {n} needs both 'path' and 'identity'")
        full = Path(src) if Path(src).is_absolute() else path.parent / src
        caption = str(row.get("caption") or "").strip() or render_caption(caption_template, identity)
        items.append(SourceItem(identity, src, str(full.resolve()), caption))
    return sorted(items)


def discover(src: Path, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> tuple[list[SourceItem], list[SourceItem]]:
    """(items, orphans) from a folder or a manifest file."""
    src = Path(src)
    if src.is_file():
        return read_manifest(src, caption_template), []
    return scan_folder(src, caption_template)

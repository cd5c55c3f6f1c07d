"""Input discovery: an identity-folder tree or a CSV/JSONL list -> sorted SourceItems, and a reject for
everything found that cannot be used.

Folder layout: ``src/<identity>/**/<image>``; a caption comes from a sidecar ``<image>.txt`` (either
``photo.txt`` or ``photo.jpg.txt``), else from the caption template. Symlinked folders and files are
followed (a folder reached twice through links is visited once).

Every file found is accounted for: a sidecar caption belongs to its photo; a file with an extension that
this Pillow can open (:func:`decodable_extensions`, the decoder table: AVIF where Pillow has it, HEIC only
with a plugin) is an item, which the decoder then accepts or rejects; anything else comes back as a reject
with its reason: another format, directly under ``src/``, a broken link, a FIFO or device, a folder that
cannot be listed. So ``accepted + rejected == found`` holds for every tree.
List files: CSV with a header (``path,identity[,caption]``) or JSONL objects with those keys; relative
paths are resolved against the list's folder; a row naming anything but a regular file is rejected; a row
with another number of columns than the header is an error naming the file and line.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fact_lightning.checks import check_template

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_TEMPLATE = "a photo of a person"
CAPTION_PLACEHOLDERS = ("identity",)
CAPTION_SUFFIX = ".txt"

# Reject reasons of discovery.
NO_IDENTITY = "no_identity_folder"
NOT_A_FILE = "not_a_file"  # a broken link, FIFO, device, socket or folder named like a photo
LINK_LOOP = "symlink_loop"
UNREADABLE_FOLDER = "unreadable_folder"
UNSUPPORTED_FORMAT = "unsupported_format"  # no decoder in this Pillow opens files named like this
HEIF = (".heic", ".heif")


@functools.cache
def decodable_extensions() -> frozenset[str]:
    """Lower-case extensions of the formats the installed Pillow can open (its plugins included)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass(frozen=True, order=True)
class SourceItem:
    identity: str
    source: str  # stable name recorded in the output (relative path or as given in the list)
    path: str    # absolute path to read
    caption: str

    def fingerprint(self) -> list:
        """Cheap change detector for resume: name, size and modification time of the file."""
        try:
            st = Path(self.path).stat()
            return [self.source, self.identity, self.caption, st.st_size, st.st_mtime_ns]
        except OSError:
            return [self.source, self.identity, self.caption, None, None]


@dataclass(frozen=True, order=True)
class Skipped:
    """Something found that will not be processed, with its reason (a line of rejects.jsonl)."""

    source: str
    identity: str
    reason: str
    detail: str = ""


@dataclass
class Discovery:
    items: list[SourceItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def found(self) -> int:
        return len(self.items) + len(self.skipped)


def render_caption(template: str, identity: str) -> str:
    return check_template(template, CAPTION_PLACEHOLDERS, "--caption-template").format(identity=identity)


def _sidecar_caption(path: Path) -> str | None:
    for candidate in (path.with_suffix(CAPTION_SUFFIX), path.with_name(path.name + CAPTION_SUFFIX)):
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text
    return None


def _file_problem(path: Path) -> str | None:
    """Why ``path`` (links followed) is not a regular file, or None."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"broken link or unreadable ({exc.strerror or exc})" if path.is_symlink() else f"{exc.strerror or exc}"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode)
            else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "socket" if stat.S_ISSOCK(st.st_mode) else "special file")
    return f"a {kind}, not a regular file"


def _is_caption(name: str, names: set[str]) -> bool:
    """Whether ``name`` is the sidecar caption of a photo beside it (``photo.txt`` or ``photo.jpg.txt``)."""
    if not name.lower().endswith(CAPTION_SUFFIX):
        return False
    stem = name[: -len(CAPTION_SUFFIX)]
    if Path(stem).suffix.lower() in decodable_extensions():
        return stem in names
    return any(Path(other).stem == stem and Path(other).suffix.lower() in decodable_extensions() for other in names)


def _skip_folder(root: Path, folder: str | Path, reason: str, detail: str) -> Skipped:
    rel = Path(os.path.relpath(folder, root))
    return Skipped(rel.as_posix(), rel.parts[0] if rel.parts else "", reason, detail)


def _walk(root: Path, skipped: list[Skipped]) -> list[Path]:
    """Every file under ``root`` but sidecar captions, following symlinked folders once each; folders that
    cannot be listed or that loop go to ``skipped``."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(err: OSError) -> None:
        skipped.append(_skip_folder(root, err.filename or root, UNREADABLE_FOLDER,
                             f"cannot list this folder ({err.strerror or err}); its files are not counted"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        dirnames.sort()
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link back into the tree, or a second link to one folder
            dirnames[:] = []
            skipped.append(_skip_folder(root, dirpath, LINK_LOOP,
                                 f"links to {os.path.realpath(dirpath)}, which is scanned already"))
            continue
        seen.add((st.st_dev, st.st_ino))
        names = set(filenames)
        found.extend(Path(dirpath) / name for name in filenames if not _is_caption(name, names))
    return found


def scan_folder(root: Path, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> Discovery:
    """Items and skipped inputs of an identity-folder tree, each sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder not found: {root}")
    found = Discovery()
    for path in _walk(root, found.skipped):
        rel = path.relative_to(root)
        identity = rel.parts[0] if len(rel.parts) > 1 else ""
        problem = _file_problem(path)
        if problem is not None:
            found.skipped.append(Skipped(rel.as_posix(), identity, NOT_A_FILE, problem))
        elif path.suffix.lower() not in decodable_extensions():
            kind = f"{path.suffix} files" if path.suffix else "files without an extension"
            hint = " (a Pillow plugin such as pillow-heif adds them)" if path.suffix.lower() in HEIF else ""
            found.skipped.append(Skipped(rel.as_posix(), identity, UNSUPPORTED_FORMAT,
                                         f"no image decoder of this installation opens {kind}{hint}"))
        elif not identity:
            found.skipped.append(Skipped(rel.as_posix(), "", NO_IDENTITY,
                                         "image directly under --src; put it in a <identity>/ folder"))
        else:
            caption = _sidecar_caption(path) or render_caption(caption_template, identity)
            found.items.append(SourceItem(identity, rel.as_posix(), str(path.absolute()), caption))
    found.items.sort()
    found.skipped.sort()
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _list_rows(path: Path) -> list[dict]:
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with path and identity, "
                                 f"got {type(row).__name__}")
            rows.append(row)
        return rows
    if path.suffix.lower() == ".csv":
        return _csv_rows(path, text)
    raise ValueError(f"an input list must be .csv or .jsonl: {path}")


def _csv_rows(path: Path, text: str) -> list[dict]:
    """Rows of a CSV list with a ``path,identity[,caption]`` header, each with the header's column count."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [name for name in ("path", "identity") if name not in header]
        if missing:
            raise ValueError(f"{path}: the header {','.join(header) or '(empty file)'} lacks {' and '.join(missing)}: "
                             "the first line must name the columns, e.g. path,identity,caption")
        rows = []
        for row in reader:
            if None in row or None in row.values():  # more values than the header names, or fewer
                got = len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
                raise ValueError(f"{path}:{reader.line_num}: {got} columns, the header has {len(header)} "
                                 f"({','.join(header)}); quote values that hold commas")
            rows.append(row)
        return rows
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: not a valid CSV file ({exc})") from None


def _text_field(path: Path, n: int, row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{path}: row {n}: {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value.strip()


def read_list(path: Path, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> Discovery:
    """Items of a CSV/JSONL list with keys path, identity and optional caption, sorted; rows that name
    anything but a regular file are skipped with their reason."""
    path = Path(path)
    found = Discovery()
    for n, row in enumerate(_list_rows(path), 1):
        src, identity = _text_field(path, n, row, "path"), _text_field(path, n, row, "identity")
        if not src or not identity:
            raise ValueError(f"{path}: row {n} needs both 'path' and 'identity'")
        full = Path(src) if Path(src).is_absolute() else path.parent / src
        problem = _file_problem(full)
        if problem is not None:
            found.skipped.append(Skipped(src, identity, NOT_A_FILE, problem))
            continue
        caption = _text_field(path, n, row, "caption") or render_caption(caption_template, identity)
        found.items.append(SourceItem(identity, src, str(full.absolute()), caption))
    found.items.sort()
    found.skipped.sort()
    return found


def discover(src: Path, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> Discovery:
    """Items and skipped inputs from a folder or a CSV/JSONL list."""
    src = Path(src)
    if src.is_file():
        return read_list(src, caption_template)
    return scan_folder(src, caption_template)

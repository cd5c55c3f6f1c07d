"""Where weights come from, checked before anything loads.

A source is a local path or a hub id (:func:`resolve_source`, decided once for every loader). :func:`check_source`
also checks every file the loader will read: in a local folder, or for a hub id in the local Hugging Face cache,
and when the cache lacks some of them, whether a download is possible at all (``local_files_only``,
``HF_HUB_OFFLINE``, else one request to the hub's endpoint, bounded to a few seconds). So a missing model is one
error naming what was looked for and where, instead of a minute of hub retries that ends in "does not appear to
have a file named config.json"; and a model that is fully cached while the hub is out of reach is read from the
cache without contacting it.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 3.0  # the longest a check waits for the hub's endpoint to answer
README_SECTION = "README.md, Real weights"  # where the user reads which files each model needs and their sources

# A name ending like a weights file is a local file, never a hub repository id.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class MissingWeightsError(FileNotFoundError):
    """Weights are not where the user said they are (a missing local path, an unreachable hub id)."""


@dataclass(frozen=True)
class WeightsSource:
    """Where ``from_pretrained`` reads weights: ``location`` is a local path (``local``) or a hub id."""

    location: str
    local: bool


@dataclass(frozen=True)
class Needed:
    """A file a loader reads, relative to the model's folder, and the names that serve as well (a ``.bin`` for a
    ``.safetensors``, a sharded index). Messages use ``name``."""

    name: str
    alternatives: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.alternatives)


@dataclass(frozen=True)
class Located:
    """The outcome of :func:`check_source`: where to load from, or (``source`` None) one sentence, ``problem``,
    naming what is missing and where it was looked for."""

    source: WeightsSource | None
    problem: str | None = None


def resolve_source(source: str | Path, what: str) -> WeightsSource:
    """Decides, in one place for every loader, whether ``source`` is a local path or a hub id.

    An existing path (``~`` expanded) is local. Otherwise a valid hub repository id (``owner/name`` or
    ``name``, checked by ``huggingface_hub.utils.validate_repo_id``) that does not end like a weights file
    is a hub id; it is fetched only if the network and ``local_files_only`` allow. Anything else is a
    local path that does not exist: :class:`MissingWeightsError` naming ``what`` and the path.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source)
    local = Path(text).expanduser()
    if text and local.exists():
        return WeightsSource(str(local), True)
    if not text.lower().endswith(WEIGHT_FILE_SUFFIXES):
        try:
            validate_repo_id(text)
            return WeightsSource(text, False)
        except HFValidationError:
            pass
    raise MissingWeightsError(f"{what} {local} does not exist (neither a local path nor a hub id)")


def missing_in_folder(folder: str | Path, needed: Iterable[Needed]) -> list[str]:
    """The ``needed`` files that ``folder`` lacks: a subfolder absent as a whole is named once (``vae/``) and
    first, then single files (``unet/config.json``), each by its first name."""
    folder = Path(folder)
    absent_dirs: list[str] = []
    files: list[str] = []
    for need in needed:
        if any((folder / name).is_file() for name in need.names()):
            continue
        parent = Path(need.name).parent
        if parent != Path(".") and not (folder / parent).is_dir():
            if f"{parent.as_posix()}/" not in absent_dirs:
                absent_dirs.append(f"{parent.as_posix()}/")
        else:
            files.append(need.name)
    return absent_dirs + files


def cached_snapshot(repo_id: str, needed: Sequence[Needed], revision: str | None = None,
                    cache_dir: str | Path | None = None) -> tuple[Path | None, list[str]]:
    """The folder of ``repo_id``'s snapshot in the local Hugging Face cache (None if nothing of it is cached) and
    the ``needed`` files that the cache lacks. Reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    folder, missing = None, []
    for need in needed:
        for name in need.names():
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
            if isinstance(hit, str):  # else None (unknown) or a marker that the hub has no such file
                folder = folder or Path(hit).parents[len(Path(name).parts) - 1]
                break
        else:
            missing.append(need.name)
    return folder, missing


def download_blocker(local_files_only: bool = False, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nothing can be downloaded from the hub now, or None when the hub's endpoint answers.

    ``local_files_only`` and huggingface_hub's offline mode (``HF_HUB_OFFLINE``) are answered without a request;
    otherwise one HEAD request to the endpoint (``HF_ENDPOINT``, proxies from the environment as for any
    download), which a refused connection, a missing route or name, or ``timeout`` seconds end. Any HTTP answer,
    an error status included, counts as reachable: the hub's own messages then say more than this check could.
    """
    from huggingface_hub import constants

    if local_files_only:
        return "downloads are off (local_files_only)"
    if constants.HF_HUB_OFFLINE:
        return "downloads are off (HF_HUB_OFFLINE is set)"
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors; ValueError: a malformed endpoint
        reason = " ".join(str(getattr(err, "reason", None) or err).split())
        return f"the network is unavailable ({endpoint} cannot be reached: {reason})"
    return None


def check_source(source: str | Path, what: str, needed: Sequence[Needed] = (), *, revision: str | None = None,
                 local_files_only: bool = False, option: str | None = None,
                 cache_dir: str | Path | None = None) -> Located:
    """Where to load ``source`` (a folder or hub id holding ``needed``) from, every needed file checked first.

    A local folder must hold every needed file. A hub id is read from the local cache when the cache holds every
    needed file and no download is possible (the hub is never contacted then); it is left to ``from_pretrained``
    when a download is possible; otherwise the problem names the hub id, the cache, why nothing can be
    downloaded and, with ``option``, the option that takes a local folder instead.
    """
    try:
        resolved = resolve_source(source, what)
    except MissingWeightsError as err:
        return Located(None, str(err))
    if resolved.local:
        if needed and not Path(resolved.location).is_dir():
            return Located(None, f"{what} {resolved.location} is a file; a folder is expected")
        missing = missing_in_folder(resolved.location, needed)
        return Located(None, f"{what} {resolved.location} is missing {', '.join(missing)}") if missing \
            else Located(resolved)
    if not needed:
        return Located(resolved)  # nothing known to look for in the cache: from_pretrained decides
    folder, missing = cached_snapshot(resolved.location, needed, revision, cache_dir)
    blocker = download_blocker(local_files_only)
    if not missing and folder is not None:
        # Complete in the cache: through the hub (which may have a newer revision) when it answers, else from disk.
        return Located(resolved if blocker is None else WeightsSource(str(folder), True))
    if blocker is None:
        return Located(resolved)
    from huggingface_hub import constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    state = "it is not in the local Hugging Face cache" if folder is None else \
        f"the local Hugging Face cache holds only part of it (missing {', '.join(missing)})"
    where = f"give {option} a local folder that holds it" if option else "give a local folder that holds it instead"
    return Located(None, f"{what} {resolved.location}: no such local folder, and as a hub id {state} ({cache}) and "
                         f"{blocker}; download it where the network is available and {where}")


def missing_files(paths: Iterable[tuple[str, str | Path | None]]) -> list[str]:
    """``(what, path)`` pairs whose path is given but does not exist, as ``"what path does not exist"``."""
    return [f"{what} {Path(path).expanduser()} does not exist" for what, path in paths
            if path is not None and str(path) and not Path(path).expanduser().exists()]


def raise_if_missing(problems: Sequence[str]) -> None:
    """One :class:`MissingWeightsError` naming every problem at once (``"; "`` between them), if there is any."""
    if problems:
        raise MissingWeightsError(f"missing weights, nothing was loaded: {'; '.join(problems)} "
                                  f"({README_SECTION}: where each file comes from)")

"""SD1.5's CLIP tokenizer, rebuilt offline from the BPE vocabulary that ships in the open-clip-torch wheel."""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

NUM_MERGES = 48894  # SD1.5 / OpenAI CLIP use the first 48,894 merges of the file: 49,408 tokens in all.


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-to-printable-character table, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merges of SD1.5's tokenizer, from open_clip's ``bpe_simple_vocab_16e6.txt.gz``."""
    lines = gzip.decompress(_packaged_vocab_file().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _packaged_vocab_file() -> Path:
    # find_spec locates the package without importing it (importing open_clip pulls in torchvision, timm...).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open-clip-torch is not installed; it ships SD1.5's BPE vocabulary")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.cache
def _cached_tokenizer(model_max_length: int):
    from transformers import CLIPTokenizer

    # transformers 4 reads vocab/merges from files, transformers 5 also accepts them: files work for both.
    # The folder lives only while the tokenizer reads it (it keeps everything in memory afterwards).
    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="fact_clip_tokenizer_") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def clip_tokenizer_from_open_clip(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` equal to SD1.5's, built without any download (a private copy per call)."""
    return copy.deepcopy(_cached_tokenizer(model_max_length))


def sdxl_second_tokenizer(first):
    """SDXL's ``tokenizer_2`` from its first: the same CLIP BPE, padding with ``!`` (id 0) instead of the end token,
    as stabilityai/stable-diffusion-xl-base-1.0's tokenizer_2 does (a private copy)."""
    second = copy.deepcopy(first)
    second.pad_token = "!"
    return second

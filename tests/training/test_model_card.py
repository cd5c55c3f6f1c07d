"""The run folder's README.md: a model card built from plain values, and written by a real fit at each export."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from fact_lightning.callbacks.model_card import CardFacts, data_facts, render_card
from fact_lightning.models.adapter_io import read_adapter_state
from tests.training.runs import ROOT, error_lines, fit_here, leftovers, write_config

PHOTO = ROOT / "tests" / "fixtures" / "faces" / "raw" / "fr_obama" / "1.jpg"

pytestmark = pytest.mark.timeout(300)

FACTS = CardFacts(
    adapter="adapters/final/adapter.safetensors", step=1200, base="path/to/sd15", tiny=False,
    init_adapter="weights/fact_adapter.ckpt", init_adapter_sha256="ab" * 32,
    data={"identities": 41, "photos": 530, "encoder": "S", "vae": "path/to/sd15"},
    recipe={"fair_weight": 0.01, "max_steps": 2000, "optimizer": "AdamW", "lr": 1e-4, "global_batch": 32},
    train={"train/loss": 0.125, "train/fair_total": 0.5}, val={"val/loss": 0.25},
    preview="previews/step-001200/grid.png", encoder_variant="S",
)


def test_the_card_names_every_fact_it_is_given():
    card = render_card(FACTS)
    for text in ("1200 steps", "Steps done: 1200", "`path/to/sd15`", "`weights/fact_adapter.ckpt`", "ab" * 32,
                 "| identities | `41` |", "| photos | `530` |", "| encoder | `S` |", "| vae | `path/to/sd15` |",
                 "| fair_weight | `0.01` |", "| max_steps | `2000` |", "| optimizer | `AdamW` |", "| lr | `0.0001` |",
                 "| global_batch | `32` |", "| train/loss | `0.125` |", "| train/fair_total | `0.5` |",
                 "| val/loss | `0.25` |", "![previews](previews/step-001200/grid.png)",
                 "fact-generate --base path/to/sd15 --face-encoder ms1mv2_model_TransFace_S.pt "
                 "--face-encoder-variant S --adapter adapters/final/adapter.safetensors",
                 "from fact_lightning.models.adapter_io import load_adapter",
                 "load_base_model('path/to/sd15')",
                 "load_adapter('adapters/final/adapter.safetensors', base.unet)"):
        assert text in card, text


def test_a_card_with_little_known_says_so():
    card = render_card(CardFacts(adapter="adapters/step-000002/adapter.safetensors", step=2,
                                 base="tiny(seed=0, cross_attention_dim=32)", tiny=True,
                                 data=data_facts(None), recipe={"lr": None}))
    assert "Init adapter: none" in card
    for name in ("identities", "photos", "encoder", "vae"):
        assert f"| {name} | `unknown` |" in card, name
    assert "| lr | `unknown` |" in card
    assert card.count("none recorded") == 2  # no train, no val figures
    assert "## Newest preview\n\nnone yet" in card
    assert "fact-generate --tiny --adapter adapters/step-000002/adapter.safetensors" in card
    assert "base = tiny_base_model(seed=0, cross_attention_dim=32)" in card


def test_data_facts_read_the_manifest_counts():
    manifest = {"counts": {"images": 12}, "identities": {"a": {}, "b": {}}, "encoder": {"variant": "tiny", "random": True},
                "vae": None}
    assert data_facts(manifest) == {"identities": 2, "photos": 12, "encoder": "tiny (random weights)",
                                    "vae": "none (latents computed in training)"}


def _row(card: str, name: str) -> str:
    found = re.search(rf"^\| {re.escape(name)} \| `(.*)` \|$", card, re.MULTILINE)
    assert found, name
    return found.group(1)


def test_a_fit_leaves_a_card_for_its_last_export(shards, tmp_path, monkeypatch):
    config = write_config(tmp_path, shards, steps=6)  # exports at steps 2, 4, 6 and final
    run = tmp_path / "run"
    assert fit_here(config, run) == 0
    card = (run / "README.md").read_text()
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    assert "Steps done: 6" in card
    assert "Base model: `tiny(seed=0, cross_attention_dim=32)`" in card and "Init adapter: none" in card
    assert _row(card, "identities") == str(manifest["counts"]["identities"])
    assert _row(card, "photos") == str(manifest["counts"]["images"])
    assert _row(card, "encoder") == manifest["encoder"]["variant"]
    recipe = {"fair_weight": "0.01", "adapter_dtype": "float64", "max_steps": "6", "accumulate_grad_batches": "2",
              "batch_size": "2", "world_size": "1", "global_batch": "4", "optimizer": "Adam", "lr": "0.001",
              "precision": "32-true", "face_drop": "0.1", "text_drop": "0.1"}
    for name, value in recipe.items():
        assert _row(card, name) == value, name
    assert "start=0.2, end=0.6, ramp_steps=8" in _row(card, "shuffle")
    assert "token_dim=64, dim=64, depth=2" in _row(card, "projection")
    assert float(_row(card, "train/loss")) > 0
    line = next(line for line in card.splitlines() if line.startswith("fact-generate "))
    adapter = re.search(r"--adapter (\S+)", line).group(1)
    assert line.startswith("fact-generate --tiny ")
    assert adapter == "adapters/final/adapter.safetensors" and (run / adapter).is_file()
    assert not leftovers(run)

    # The card's own lines load the adapter, run from the run folder: the Python ones and fact-generate's.
    monkeypatch.chdir(run)
    python = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    scope: dict = {}
    exec(python, scope)
    saved = read_adapter_state(run / adapter)[2]
    loaded = scope["adapter"].state_dict()
    assert len(scope["adapter"].sites) == 16 and loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved)  # float64 file, float32 module
    from fact_lightning.inference.cli import main

    bash = re.search(r"```bash\n(.*?)```", card, re.DOTALL).group(1).replace("\\\n", " ")
    args = shlex.split(bash)[1:]
    args[args.index("me1.jpg")] = str(PHOTO)
    args[args.index("out/generate")] = str(tmp_path / "generated")
    assert main([*args, "--steps", "1", "--height", "64", "--width", "64"]) == 0
    assert list((tmp_path / "generated" / "images").glob("*.png"))


def test_a_failed_card_write_is_one_line_and_the_next_fit_clears_a_killed_one(shards, tmp_path, monkeypatch,
                                                                              capsys):
    import errno

    from fact_lightning.callbacks import model_card

    def full_disk(path, data):
        path.write_bytes(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_card, "_write_file", full_disk)
    run = tmp_path / "run"
    assert fit_here(write_config(tmp_path, shards, steps=2), run) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(run / "README.md") in lines[0], lines
    assert not (run / "README.md").exists() and not leftovers(run)
    assert (run / "adapters" / "step-000002" / "adapter.safetensors").is_file()  # the export itself is whole

    monkeypatch.undo()
    (run / ".README.md.tmp-99999").write_bytes(b"# half a card")  # what a card write killed half-way leaves
    assert fit_here(write_config(tmp_path, shards, steps=2), run) == 0
    assert "Steps done: 2" in (run / "README.md").read_text() and not leftovers(run)

"""Each command's --help speaks of its own options only: fact-evaluate has no inpainting mode, so its help never
names --template; fact-generate's help gives the inpainting defaults (notes added by ``command(notes=...)``)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from fact_lightning.commands.options import command
from fact_lightning.evaluation.cli import app as evaluate_app
from fact_lightning.inference.cli import app as generate_app


def _help(app: typer.Typer) -> str:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}, prog_name="fact")
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())  # the help's words, wrapping and boxes aside


def test_fact_evaluate_help_names_no_option_it_lacks():
    text = _help(evaluate_app)
    assert "--template" not in text and "inpainting" not in text.lower()
    assert "default 0.5, the official app's" in text and "(default 7.0)" in text


def test_fact_generate_help_keeps_the_inpainting_defaults():
    text = _help(generate_app)
    assert ("SD1.5 or SDXL diffusers folder or hub id, or a single SD1.5 or SDXL .safetensors file. An inpainting "
            "model "
            "with --template.") in text
    assert "With --template: 0.55, the official inpainting app's." in text
    assert "(default 7.0). With --template: default 5.0." in text


def test_fact_generate_help_names_each_base_and_its_own_sampler():
    text = _help(generate_app)
    assert "a FACT adapter on SD1.5 or SDXL (the adapter file says which)" in text
    assert "default: the base's own: PNDM for SD1.5 (the official apps'), Euler for SDXL." in text
    assert "--base-type" in text
    assert "default: what the --adapter file records, else what --base holds, else sd15" in text


@dataclasses.dataclass(kw_only=True)
class _Options:
    name: Annotated[str, typer.Option(help="A name.")] = "x"


def _run(opts: _Options) -> None:
    pass


def test_a_note_for_an_option_the_command_lacks_is_refused():
    assert command(notes={"name": "Noted."})(_run) is not None
    with pytest.raises(TypeError, match="nmae"):
        command(notes={"nmae": "Noted."})(_run)

"""Every shipped config parses with fact-train's parser; a typo fails with LightningCLI's message."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.cli import LightningArgumentParser

from fact_lightning.cli import FactCLI
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.training.module import FactModule

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
OVERRIDES = {"sd15_fsdp.yaml": ["sd15.yaml"]}  # an override file is parsed on top of these


def parse_only(*args: str):
    """fact-train's parser (trainer, model, data, links) without instantiating anything: no weights needed."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(pl.Trainer, "trainer")
    parser.add_lightning_class_args(FactModule, "model")
    parser.add_lightning_class_args(FactDataModule, "data")
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    FactCLI.add_arguments_to_parser(None, parser)
    parser.add_argument("--config", action="config")
    return parser.parse_args(list(args))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    first = [a for base in OVERRIDES.get(path.name, []) for a in ("--config", str(path.parent / base))]
    config = parse_only(*first, "--config", str(path))
    assert config.model.base.class_path.startswith("fact_lightning.training.base_spec.")
    assert config.data.token_dim == config.model.projection.token_dim


def test_typo_fails_with_lightningcli_message(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text((CONFIGS[0].parent / "tiny.yaml").read_text().replace("fair_weight:", "fair_wieght:"))
    with pytest.raises(SystemExit):
        FactCLI(FactModule, FactDataModule, run=False, args=["--config", str(bad)])
    err = capsys.readouterr().err
    assert "fair_wieght" in err and "error:" in err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipes_follow_the_paper(path):
    """The curriculum's ramp follows trainer.max_steps, FAIR is Eq. 3 as written, and no recipe clips gradients
    (the DDP and FSDP2 recipes must train the same way)."""
    first = [a for base in OVERRIDES.get(path.name, []) for a in ("--config", str(path.parent / base))]
    config = parse_only(*first, "--config", str(path))
    assert config.model.shuffle.ramp_steps is None and config.trainer.max_steps > 0
    assert config.model.fair_denominator == "live"
    assert config.trainer.gradient_clip_val is None

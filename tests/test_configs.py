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


def test_the_recipe_warms_up_then_holds_the_papers_rate():
    """sd15.yaml's scheduler, built as fact-train builds it (per optimizer step): 1e-6 at step 0, the paper's 1e-4
    from step 500 on; `--model.lr_scheduler null` gives the paper's constant rate."""
    import torch

    config = parse_only("--config", str(CONFIGS[0].parent / "sd15.yaml"))
    spec = config.model.lr_scheduler
    assert spec.class_path == "torch.optim.lr_scheduler.LinearLR"
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=config.model.optimizer.init_args.lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, **spec.init_args)
    rates = []
    for _step in range(600):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-6) and rates[250] < rates[499] < 1e-4
    assert all(rate == pytest.approx(1e-4) for rate in rates[500:])
    plain = parse_only("--config", str(CONFIGS[0].parent / "sd15.yaml"), "--model.lr_scheduler", "null")
    assert plain.model.lr_scheduler is None

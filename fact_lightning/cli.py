"""``fact-train``: the LightningCLI program (fit, validate, test, predict; --config; --ckpt_path last)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data.datamodule import FactDataModule
from .training.module import FactModule


class FactCLI(LightningCLI):
    """LightningCLI with the model/data links FACT needs."""

    def add_arguments_to_parser(self, parser) -> None:
        # The shards' token width is checked against the projection's input width.
        parser.link_arguments("model.projection.token_dim", "data.token_dim")


def build_cli(args: list[str] | None = None) -> FactCLI:
    """Parses ``args`` (default: sys.argv) and runs the subcommand; returns the CLI (its trainer, model...)."""
    return FactCLI(
        FactModule,
        FactDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train FACT face adapters on Stable Diffusion 1.5."},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: returns None so that ``sys.exit(main())`` exits 0 on success."""
    build_cli(args)


if __name__ == "__main__":
    main()

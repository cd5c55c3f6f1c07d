"""``fact-train``: the LightningCLI program (``fit`` and ``validate``; ``--config``; ``--ckpt_path last``).

One run, one folder: ``trainer.default_root_dir`` holds the TensorBoard events, ``config.yaml``,
``checkpoints/``, ``adapters/`` and ``previews/`` of a run, so that one option moves everything and a resumed
run (``--ckpt_path last``) continues the same curves. Mistakes a user can make end in one line and exit 2.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from .commands.cli_errors import guarded
from .data.datamodule import FactDataModule
from .training.base_spec import spec_vae_name
from .training.checkpoints import AtomicCheckpointIO, resolve_last
from .training.module import FactModule

DEFAULT_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


class FactCLI(LightningCLI):
    """LightningCLI with FACT's links, its run folder and its checks before training."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No test or predict step exists: offer only what runs.
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        # The shards' token width is checked against the projection's input width.
        parser.link_arguments("model.projection.token_dim", "data.token_dim")
        # The shards' cached VAE latents (if any) are checked against the model's VAE.
        parser.link_arguments("model.base", "data.vae", compute_fn=spec_vae_name)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.logger in (None, True):  # the run folder itself is the TensorBoard log dir: no version_N
            trainer.logger = Namespace(class_path=DEFAULT_LOGGER, init_args=Namespace(
                save_dir=trainer.default_root_dir or ".", name="", version="", default_hp_metric=False))

    def instantiate_trainer(self, **kwargs):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def before_fit(self) -> None:
        self.datamodule.check()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(resolve_last(self.checkpoint_folder()))

    def before_validate(self) -> None:
        self.datamodule.check()

    def checkpoint_folder(self) -> Path:
        """Where the run's ModelCheckpoint writes: its ``dirpath``, else ``<run folder>/checkpoints``."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints"


def build_cli(args: list[str] | None = None) -> FactCLI:
    """Parses ``args`` (default: sys.argv) and runs the subcommand; returns the CLI (its trainer, model...)."""
    return FactCLI(
        FactModule,
        FactDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train FACT face adapters on Stable Diffusion 1.5."},
        args=args,
    )


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_library_noise() -> None:
    """Drops library messages that say nothing about this run (advertising, warnings about intended states)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("litlogger"))
    # The shards' manifest says so already when the face encoder is random (the data module warns once).
    logging.getLogger("fact_lightning.interop.official").addFilter(_DropMessages("RANDOMLY INITIALISED"))
    # Lightning's internals call a torch API that torch itself has deprecated: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # The frozen SD1.5 parts are in eval mode on purpose (no dropout, fixed norms).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
    # Without data.val_root the validation loaders are an empty list, which Lightning reports as zero length.
    warnings.filterwarnings("ignore", message=r".*Total length of .* across ranks is zero", category=UserWarning)
    # The data module saves and restores its position itself (a resumed run continues the data order).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def main(args: list[str] | None = None) -> None:
    """Console entry point: exit 0 on success, 2 with one line for a mistake the user can fix (a Lightning
    misconfiguration such as a GPU config on a machine without one included)."""
    quiet_library_noise()
    guarded(build_cli, also=(MisconfigurationException,))(args)


if __name__ == "__main__":
    main()

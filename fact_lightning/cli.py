"""``fact-train``: the LightningCLI program (``fit`` and ``validate``; ``--config``; ``--ckpt_path last``).

One run, one folder: ``trainer.default_root_dir`` holds the TensorBoard events, ``config.yaml``,
``checkpoints/``, ``adapters/`` and ``previews/`` of a run, so that one option moves everything and a resumed
run (``--ckpt_path last``) continues the same curves. Mistakes a user can make end in one line and exit 2.

The folder has one owner: a command holds its lock (``.fact-train.lock``, rank 0 only) until it ends, so a
second fit into it stops with one line. ``--ckpt_path last`` is the newest intact step in the folder
(``checkpoints.resolve_last``); a file given as ``--ckpt_path`` is read once before anything is written and
refused in one line if it is no training checkpoint, or if this run changes an option that its state cannot
follow (``training/resume.py``), so ``config.yaml`` is rewritten only by a run that does what it says. Every fit
saves its last step and stops on SIGTERM/SIGINT/SIGUSR1/SIGHUP at a step boundary with a checkpoint
(``callbacks/run_end.py``, exit status 128 + the signal's number).

``validate`` computes the fit's validation numbers for any checkpoint (``--ckpt_path``) and writes its events
and config to ``<run folder>/validate``, at the checkpoint's step, never into the fit's own curves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks.run_end import RunEnd
from .commands.cli_errors import guarded
from .commands.console import quiet_library_noise
from .data.datamodule import FactDataModule
from .errors import UserError
from .files import FolderBusy, locked_folder
from .training import resume
from .training.base_spec import spec_vae_name
from .training.checkpoints import HPC_PATTERN, AtomicCheckpointIO, read_checkpoint, resolve_last
from .training.module import FactModule
from .weights import missing_files, raise_if_missing

log = logging.getLogger(__name__)

DEFAULT_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
RUN_LOCK = ".fact-train.lock"
VALIDATE_FOLDER = "validate"  # fact-train validate's events and config.yaml, inside the run folder
_CHECKPOINT_WORDS = ("best", "last", "hpc")  # what Lightning reads as a ckpt_path other than a file
_GPU_ACCELERATORS = ("gpu", "cuda")
# What runs any config on one CPU process: each trainer setting, and its CPU value.
_CPU_SETTINGS = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true"}


class _OneLineParser(LightningArgumentParser):
    """A config or command-line mistake (a typo in a key, a wrong type, a missing --config file) is one
    ``error:`` line and a pointer to --help, not the whole usage text before it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying alternatives: it handles the error itself
            return super().error(message, ex)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        print(f"(see {self.prog.replace(' [options]', '')} --help)", file=sys.stderr, flush=True)
        self.exit(2)


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
        if self.subcommand == "validate" and _is_tensorboard(trainer.logger):
            # A fit's config.yaml names its run folder as the log dir: validate writes beside it, in
            # <run>/validate (its events, config.yaml), never into the fit's curves or over its config.
            trainer.logger = Namespace(class_path=DEFAULT_LOGGER, init_args=Namespace(
                save_dir=str(Path(trainer.default_root_dir or ".") / VALIDATE_FOLDER), name="", version="",
                default_hp_metric=False))
        elif trainer.logger in (None, True):  # the run folder itself is the TensorBoard log dir: no version_N
            trainer.logger = Namespace(class_path=DEFAULT_LOGGER, init_args=Namespace(
                save_dir=trainer.default_root_dir or ".", name="", version="", default_hp_metric=False))

    def instantiate_trainer(self, **kwargs):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        try:
            return super().instantiate_trainer(plugins=plugins, **kwargs)
        except MisconfigurationException as err:
            settings = self._get(self.config, "trainer", default=Namespace())
            message = missing_gpu_message(settings, err)
            if message is None:
                raise
            raise UserError(message) from None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace this run's model options with the checkpoint's hyper-parameters when
        # --ckpt_path is a file (not for "last"): a changed option silently dropped, and a full torch.load
        # whose error advises weights_only=False. resume.check (in before_fit) applies or refuses each change.
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        # The lock wraps before_<subcommand> too: resolving "last" and the checks see the folder as it stays.
        if not self._is_launching_rank_zero():  # other ranks share the folders rank 0 holds
            return super()._run_subcommand(subcommand)
        with contextlib.ExitStack() as held:
            for folder in self.owned_folders():
                try:
                    held.enter_context(locked_folder(folder, RUN_LOCK))
                except FolderBusy as busy:
                    raise UserError(f"another fact-train (pid {busy.holder}) is writing to {folder}: wait for it to "
                                    "end, or give this run its own trainer.default_root_dir") from None
            super()._run_subcommand(subcommand)

    def owned_folders(self) -> list[Path]:
        """The run folder, and every folder a callback writes to outside it (a ``dirpath`` set elsewhere:
        checkpoints, adapters, previews): two runs must not share any of them."""
        run = self.run_folder()
        folders = [run]
        for callback in self.trainer.callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if isinstance(dirpath, (str, os.PathLike)) and dirpath:
                if not Path(dirpath).resolve().is_relative_to(run.resolve()):
                    folders.append(Path(dirpath))
        return folders

    def _is_launching_rank_zero(self) -> bool:
        """Rank 0 of the whole job, told before the processes start (from the cluster environment's variables:
        LOCAL_RANK, NODE_RANK, RANK, SLURM_PROCID...)."""
        environment = getattr(self.trainer.strategy, "cluster_environment", None)
        if environment is None:
            return True
        return environment.global_rank() == 0 and environment.local_rank() == 0 and environment.node_rank() == 0

    def run_folder(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def check_weights(self) -> None:
        """Every weight file this run would load, checked before anything loads: one error names all that are
        missing (the base model's files, then each ``*weights`` file the config names, and ``model.init_adapter``)."""
        problems = list(self.model.base_spec.weight_problems())
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems += missing_files([*named_weight_files(config), ("model.init_adapter", self.model.hparams.init_adapter)])
        raise_if_missing(problems)
        self.model.check_init_adapter()  # its sizes against the model's, before anything is written

    def before_fit(self) -> None:
        self.check_weights()
        self.datamodule.check()
        config = self.config_init[self.subcommand]
        verify = True
        if config.get("ckpt_path") == "last":
            hpc = sorted(Path(self.trainer.default_root_dir).glob(HPC_PATTERN))  # SLURM requeue saves
            config["ckpt_path"], verify = str(resolve_last(self.checkpoint_folder(), extra=hpc)), False  # checked
        checkpoint = self._read_ckpt_path(config.get("ckpt_path"), verify)
        if checkpoint is not None:
            # Before config.yaml is rewritten: a change the checkpoint's state cannot follow is refused here.
            applied = resume.check(checkpoint, self.model, self.datamodule)
            if applied:
                log.warning("resuming at step %s with changed options, applied from here on (config.yaml records "
                            "them): %s", checkpoint.get("global_step"), resume.describe(applied))

    def before_validate(self) -> None:
        if not self.datamodule.hparams.val_root:  # Lightning would run zero batches and exit 0
            raise UserError("fact-train validate needs validation data: set data.val_root to a shard folder")
        self.check_weights()
        self.datamodule.check()
        checkpoint = self._read_ckpt_path(self.config_init[self.subcommand].get("ckpt_path"), verify=True)
        if checkpoint is not None:
            # Logged at the x of the fit's own validation of these weights (Lightning's logging step counter,
            # which validate alone would leave at 0), so the two curves line up in TensorBoard.
            loop = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            stepped = loop.get("_batches_that_stepped")
            if isinstance(stepped, int):
                self.trainer.fit_loop.epoch_loop._batches_that_stepped = stepped

    def _read_ckpt_path(self, ckpt_path, verify: bool) -> dict | None:
        """The checkpoint a file ``--ckpt_path`` names (tensors memory-mapped), or one error line naming it."""
        if not ckpt_path or str(ckpt_path) in _CHECKPOINT_WORDS or str(ckpt_path).startswith("registry"):
            return None
        return read_checkpoint(ckpt_path, mmap=True, verify=verify)

    def checkpoint_folder(self) -> Path:
        """Where the run's ModelCheckpoint writes: its ``dirpath``, else ``<run folder>/checkpoints``."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath:
            return Path(callback.dirpath)
        return self.run_folder() / "checkpoints"


def _is_tensorboard(logger) -> bool:
    """The default logger (unset, True) or a TensorBoardLogger named in the config."""
    if logger in (None, True):
        return True
    return isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger")


def named_weight_files(config, where: str = "") -> Iterator[tuple[str, str]]:
    """``(name, path)`` for every value the parsed config gives to an argument named ``*weights`` (a file or a
    folder of weights, e.g. ``Previews.encoder_weights``); a class's arguments are named after the class."""
    if isinstance(config, Namespace):
        if config.get("class_path"):
            yield from named_weight_files(config.get("init_args"), str(config["class_path"]).rpartition(".")[2])
            return
        for key, value in vars(config).items():
            name = f"{where}.{key}" if where else key
            if key.endswith("weights") and isinstance(value, (str, os.PathLike)) and str(value):
                yield name, str(value)
            else:
                yield from named_weight_files(value, name)
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            yield from named_weight_files(value, f"{where}[{i}]")


def missing_gpu_message(settings, err: Exception) -> str | None:
    """For a trainer that asks for more GPUs than this machine shows: its GPU settings as set, what is visible,
    and the overrides that run the same config on this machine's CPU (or on the GPUs it has). None for any other
    misconfiguration."""
    import torch

    accelerator = str(settings.get("accelerator"))
    if accelerator not in _GPU_ACCELERATORS:
        return None
    visible = torch.cuda.device_count()
    asked = settings.get("devices")
    wanted = len(asked) if isinstance(asked, (list, tuple)) else int(asked) if str(asked).isdigit() else None
    if visible and (wanted is None or wanted <= visible):
        return None  # the GPUs are there: something else is wrong, and Lightning's own message says what
    named = ", ".join(f"trainer.{key} {settings.get(key)}" for key in _CPU_SETTINGS if settings.get(key) is not None)
    cpu = " ".join(f"--trainer.{key} {value}" for key, value in _CPU_SETTINGS.items()
                   if settings.get(key) is not None and str(settings.get(key)) not in (str(value), "auto"))
    found = "no GPU is visible here" if visible == 0 else f"only {visible} GPU(s) are visible here"
    elsewhere = f"run it where {wanted} GPU(s) per node are visible" if wanted else "run it where GPUs are visible"
    if visible:
        elsewhere += f", here on {visible} with --trainer.devices {visible}"
    reason = " ".join(str(err).split())
    return f"this config trains on GPUs ({named}) but {found} ({reason}): {elsewhere}, or on this machine's CPU " \
           f"with {cpu}"


def build_cli(args: list[str] | None = None) -> FactCLI:
    """Parses ``args`` (default: sys.argv) and runs the subcommand; returns the CLI (its trainer, model...)."""
    return FactCLI(
        FactModule,
        FactDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RunEnd()]},  # every fit saves its last step and stops cleanly on signals
        parser_kwargs={"description": "Train FACT face adapters on Stable Diffusion 1.5 or SDXL."},
        parser_class=_OneLineParser,
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point: exit 0 on success, 2 with one line for a mistake the user can fix (a Lightning
    misconfiguration such as a GPU config on a machine without one included)."""
    quiet_library_noise()
    guarded(build_cli, also=(MisconfigurationException,))(args)


if __name__ == "__main__":
    main()

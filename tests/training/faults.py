"""A test callback that signals its own process at a named moment of a fit (added with --trainer.callbacks+=):

* ``micro-batch``: after a micro-batch inside the accumulation window that leads to step ``step + 1``;
* ``checkpoint``: inside the write of a checkpoint file of step ``step`` (its temporary file);
* ``export``: inside the write of the adapter export ``name`` (``step-000004``, ``final``).

SIGKILL inside a write first cuts the temporary file to ``cut`` of its length (a write the kernel had not
finished); another signal lands in the middle of the write and the write goes on.
"""

from __future__ import annotations

import os
import signal as signals
from pathlib import Path

import lightning.pytorch as pl
import safetensors.torch
import torch


class SignalAt(pl.Callback):
    def __init__(self, point: str, step: int = 0, signal: str = "SIGKILL", cut: float = 0.5, name: str = "",
                 times: int = 1):
        if point not in ("micro-batch", "checkpoint", "export"):
            raise ValueError(point)
        self.point, self.step, self.signum, self.cut, self.name = point, step, signals.Signals[signal], cut, name
        self.times = times  # signals sent at once (a second Ctrl-C)
        self._start_step = -1
        self._undo = []
        self._fired = False  # once per run: a step's top-k and last saves are two writes

    def setup(self, trainer, pl_module, stage) -> None:
        if self.point == "checkpoint":
            original = torch.save

            def save(obj, f, *args, **kwargs):
                name = str(getattr(f, "name", f))
                mine = ".ckpt." in Path(name).name and isinstance(obj, dict) and obj.get("global_step") == self.step
                return self._around(mine, name, lambda: original(obj, f, *args, **kwargs), f)

            torch.save = save
            self._undo.append(lambda: setattr(torch, "save", original))
        elif self.point == "export":
            original_st = safetensors.torch.save_file

            def save_file(tensors, filename, *args, **kwargs):
                mine = f".{self.name}.tmp-" in str(filename)
                return self._around(mine, str(filename), lambda: original_st(tensors, filename, *args, **kwargs))

            safetensors.torch.save_file = save_file
            self._undo.append(lambda: setattr(safetensors.torch, "save_file", original_st))

    def teardown(self, trainer, pl_module, stage) -> None:  # in-process runs: leave torch as it was
        for undo in self._undo:
            undo()
        self._undo = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")

    def _around(self, mine: bool, filename: str, write, f=None):
        if not mine or self._fired:
            return write()
        if self.signum != signals.SIGKILL:
            self._send()  # handled between two bytecodes of this write
            return write()
        write()
        if f is not None:
            f.flush()
        size = os.path.getsize(filename)
        os.truncate(filename, int(size * self.cut))
        os.kill(os.getpid(), signals.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.point == "micro-batch" and trainer.global_step == self._start_step == self.step:
            self._send()

    def _send(self) -> None:
        self._fired = True
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)


def save_forever(path: str, steps, tmpdir: str) -> None:
    """Saves checkpoints of step 1, 2, ... to ``path`` with the real writer until killed, sending each step
    number on ``steps`` (a multiprocessing connection) once its save is complete; ``tmpdir`` is the
    process's TMPDIR (the writer must not put its temporary file there)."""
    import tempfile

    from fact_lightning.training.checkpoints import AtomicCheckpointIO

    os.environ["TMPDIR"], tempfile.tempdir = tmpdir, None
    writer, step = AtomicCheckpointIO(), 0
    while True:
        step += 1
        writer.save_checkpoint({"global_step": step, "w": torch.full((4_000_000,), float(step))}, path)
        steps.send(step)

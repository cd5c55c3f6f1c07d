"""How a fit ends: with a checkpoint of its last step, whether it ran out of steps or was asked to stop.

* The last step is always saved. ``ModelCheckpoint(every_n_train_steps=N)`` saves on its schedule only: a run
  of 7 steps with N=5 ended with ``last.ckpt`` at step 5. At the run's last optimizer step every
  ModelCheckpoint saves as its schedule would (top-k and ``last``), so the state is that of a mid-run save
  and a longer resume continues exactly; ``on_train_end`` catches runs that end otherwise (early stopping).
* SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGHUP (unless ignored, as ``nohup`` does) stop a fit at the next
  optimizer-step boundary: the handler only sets a flag; at the boundary all ranks agree (one all-reduce),
  ``last`` is saved, and :class:`RunStopped` ends the fit with exit status 128 + the signal's number. Never
  mid-accumulation: a checkpoint there would lose the gradients already summed. A second signal stops at
  once, without a checkpoint. A signal after the last step's boundary lets the run finish (its final
  export): it exits 0, complete. Under SLURM with auto-requeue, SIGUSR1 stays Lightning's
  (``SLURMEnvironment``: an HPC checkpoint, then ``scontrol requeue``). Lightning's own SIGTERM handling
  would end the fit with status 0 and no checkpoint: it is replaced.
* ``last`` is never versioned: Lightning's version counter wrote ``last-v1.ckpt`` beside a stale ``last.ckpt``
  when a resumed run's folder had moved; without it ``last.ckpt`` is replaced (atomically, by our IO).
"""

from __future__ import annotations

import logging
import signal
import threading

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class RunStopped(SystemExit):
    """The fit stopped on a signal after saving its checkpoint; exit status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def save_checkpoints_now(trainer: pl.Trainer, last_only: bool = False) -> None:
    """Makes every ModelCheckpoint save the current step, as its own every-N-steps branch does (its top-k
    unless ``last_only``, then ``last``), unless it saved this step already. A callback without ``save_last``
    still writes ``last.ckpt``: a resume must find this step whatever the schedule."""
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback._last_global_step_saved == trainer.global_step:
            continue
        # ModelCheckpoint's own save path (private API, the calls its on_train_batch_end makes): its bookkeeping
        # (last_model_path, top-k, the step saved) stays right, so its own hooks do not save this step again.
        candidates = callback._monitor_candidates(trainer)
        if not last_only and (callback.monitor is None or callback.monitor in candidates):
            callback._save_topk_checkpoint(trainer, candidates)
        if callback.save_last:
            callback._save_last_checkpoint(trainer, candidates)
        elif last_only or callback._last_global_step_saved != trainer.global_step:
            last = callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST)
            callback._save_checkpoint(trainer, last)


def _is_last_step(trainer: pl.Trainer) -> bool:
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs
            and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch))


class RunEnd(pl.Callback):
    """Saves the last step when a fit ends, and stops a fit on SIGTERM/SIGINT/SIGUSR1/SIGHUP at a step boundary
    after saving it (see the module's docstring). ``fact-train`` adds it to every fit."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal of this fit
        self._previous: dict[int, object] = {}
        self._step_at_batch_start: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback._enable_version_counter = False  # a private flag: the constructor's enable_version_counter

    # -- signals ------------------------------------------------------------------------------------------
    def _signals(self, trainer: pl.Trainer) -> list[int]:
        wanted = [signal.SIGTERM, signal.SIGINT]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # a closed terminal; nohup ignores it: so do we
            wanted.append(signal.SIGHUP)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            wanted.append(signal.SIGUSR1)
        return wanted

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning registers its own (just before the training stage), replacing them.
        self.signum = None
        if trainer.received_sigterm:  # arrived between Lightning's registration and now: ours to handle
            self.signum = signal.SIGTERM
            trainer._signal_connector.received_sigterm = False  # else Lightning ends the fit with status 0
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self._signals(trainer):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            log.warning("received %s again: stopping now, without a checkpoint", _name(signum))
            raise RunStopped(signum)
        self.signum = signum
        log.warning("received %s: stopping after this optimizer step, with a checkpoint (send it again to stop at "
                    "once)", _name(signum))

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous = {}

    # -- step boundaries ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside an accumulation window: no optimizer step yet, so no boundary
        stop = self.signum is not None
        if trainer.world_size > 1:  # one rank's signal stops all ranks at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        last = _is_last_step(trainer)
        if stop or last:
            save_checkpoints_now(trainer, last_only=stop and not last)
        if stop:
            signum = self.signum or signal.SIGTERM
            saved = ("resume with --ckpt_path last" if trainer.checkpoint_callbacks
                     else "no checkpoint (checkpointing is off)")
            log.warning("stopped by %s at step %d; %s", _name(signum), trainer.global_step, saved)
            raise RunStopped(signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The handlers stay until teardown: a signal during the final export waits for it to finish.
        save_checkpoints_now(trainer)  # a run that ended other than at max_steps (early stopping, max_epochs)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

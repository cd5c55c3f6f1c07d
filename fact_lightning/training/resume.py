"""What a resume may change: every option is either applied (and so truthfully recorded in the run's
``config.yaml``) or refused with one line naming it and both values.

A checkpoint restores state that would silently override some options: Adam's param groups bring back
the old learning rate, betas and weight decay, and an LR scheduler's state brings back all its settings.
The policy, by option class:

* applied: what the module reads at every step (condition drops, losses, seed, curriculum), the data and
  trainer options, and the optimizer's hyper-parameters, written into the restored param groups
  (:func:`apply_optimizer_settings`; with a scheduler, its base learning rate moves with ``lr``);
* refused (:class:`ResumeRefused`): what fixes the adapter's tensors (``model.projection``, ``model.sites``,
  ``model.adapter_dtype``; the base model has its own check), another optimizer or LR scheduler class, a
  scheduler added or removed, and any scheduler setting (its restored state would override it);
* ``model.init_adapter``: the same file (same sha256) resumes, under the same or another path (a moved file
  is an applied change, logged); the checkpoint's adapter weights win, as Lightning restores them after
  ``configure_model`` loaded the file. Another file's content, or the option added or removed, is refused:
  an official file's ``ln`` replaces the frozen UNet's norm2, which checkpoints do not hold, so the resumed
  run would train against other norms than the run it continues.
* the adapter's EMA (``callbacks/ema.py``, a callback's state in the checkpoint): applied from here on, with a
  warning. A changed decay or warm-up continues the saved average with the new settings; an EMA added starts
  from the resumed weights; an EMA removed drops the checkpoint's average (nothing else depends on it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1  # of the "fact" record FactModule writes into each checkpoint
REFUSED_MODEL_OPTIONS = ("projection", "sites", "adapter_dtype")  # they decide the adapter's tensors
INIT_ADAPTER_CONTENT = "init_adapter_sha256"  # recorded by FactModule; the path alone may change
# Scheduler state that is progress, not a setting (torch's LRScheduler, ReduceLROnPlateau, SequentialLR...).
_SCHEDULER_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
                       "base_lrs", "verbose", "best", "num_bad_epochs", "cooldown_counter", "lr_lambdas"}
_NEW_RUN = "a resumed run keeps it; start a new run (another trainer.default_root_dir) to change it"

Change = tuple[str, Any, Any]  # (option, checkpoint's value, this run's value)


class ResumeRefused(UserError):
    """A resume with an option changed that the checkpoint's state cannot follow."""


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.as_tensor(a).tolist() == torch.as_tensor(b).tolist()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}", item))
        return out
    return {prefix: value}


def option_changes(saved: dict, current: dict, prefix: str) -> list[Change]:
    """The options (``prefix.name``, nested dicts flattened) whose values differ; keys only one side has
    (new options, Lightning's ``_instantiator``) are not changes."""
    old, new = _flat(prefix, {k: v for k, v in saved.items() if not str(k).startswith("_")}), \
        _flat(prefix, {k: v for k, v in current.items() if not str(k).startswith("_")})
    return [(name, old[name], new[name]) for name in sorted(old.keys() & new.keys()) if not _same(old[name], new[name])]


def refuse_model_changes(saved_hparams: dict, hparams: dict) -> list[Change]:
    """Raises :class:`ResumeRefused` for a changed adapter shape (Prj's sizes, the SFAGS sites) or dtype; returns
    the other (applied) changes."""
    changes = option_changes(saved_hparams, hparams, "model")
    for name, old, new in changes:
        if name.split(".")[1] in REFUSED_MODEL_OPTIONS:
            raise ResumeRefused(f"{name} is {new!r} but the checkpoint was trained with {old!r}: it fixes the "
                                f"adapter's weights; {_NEW_RUN}")
        if name.split(".")[1] == INIT_ADAPTER_CONTENT:
            raise ResumeRefused(f"model.init_adapter {hparams.get('init_adapter')!r} (sha256 {new}) is not the file "
                                f"the checkpoint started from ({saved_hparams.get('init_adapter')!r}, sha256 {old}): "
                                "an official file's norms are part of the model; resume with that file, or start a new run "
                                "(another trainer.default_root_dir)")
    return changes


def settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's hyper-parameters per param group (everything but the parameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _scheduler_settings(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _scheduler_settings(v) for k, v in state.items() if k not in _SCHEDULER_PROGRESS}
    if isinstance(state, (list, tuple)):
        return [_scheduler_settings(v) for v in state]
    return state


def refuse_optimizer_changes(checkpoint: dict, optimizer_factory: Callable | None,
                             scheduler_factory: Callable | None) -> list[Change]:
    """Compares the optimizer and scheduler this run configures (built over a stand-in parameter: cheap)
    with the checkpoint's; raises :class:`ResumeRefused` for what a restore would silently override and
    returns the optimizer hyper-parameters that the restored run applies (:func:`apply_optimizer_settings`)."""
    if optimizer_factory is None or not checkpoint.get("optimizer_states"):
        return []
    try:
        optimizer = optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        scheduler = scheduler_factory(optimizer) if scheduler_factory is not None else None
    except Exception as exc:  # a factory that needs the real parameters: the module still applies at start
        log.debug("cannot compare the optimizer settings before the run: %s", exc)
        return []
    fact = checkpoint.get("fact") or {}
    saved_groups = [{k: v for k, v in g.items() if k != "params"}
                    for g in checkpoint["optimizer_states"][0].get("param_groups", [])]
    saved_class = fact.get("optimizer")
    if saved_class is not None and saved_class != class_path(optimizer):
        raise ResumeRefused(f"model.optimizer is {class_path(optimizer)} but the checkpoint was trained with "
                            f"{saved_class}: its state does not carry over; {_NEW_RUN}")
    names = lambda group: set(group) - {"initial_lr"}  # noqa: E731 (a scheduler adds initial_lr)
    if saved_class is None and saved_groups and names(saved_groups[0]) != names(settings(optimizer)[0]):
        raise ResumeRefused(f"model.optimizer is {class_path(optimizer)}, another optimizer than the checkpoint's "
                            f"(its settings {sorted(saved_groups[0])}); {_NEW_RUN}")
    saved_schedulers = checkpoint.get("lr_schedulers") or []
    if len(saved_schedulers) != (scheduler is not None):
        old = fact.get("lr_scheduler") or ("a scheduler" if saved_schedulers else "none")
        raise ResumeRefused(f"model.lr_scheduler is {class_path(scheduler) if scheduler is not None else 'none'} but "
                            f"the checkpoint was trained with {old}: a schedule cannot be added or removed; {_NEW_RUN}")
    if scheduler is not None:
        saved_class = fact.get("lr_scheduler")
        if saved_class is not None and saved_class != class_path(scheduler):
            raise ResumeRefused(f"model.lr_scheduler is {class_path(scheduler)} but the checkpoint was trained with "
                                f"{saved_class}; {_NEW_RUN}")
        changed = option_changes(_scheduler_settings(saved_schedulers[0]), _scheduler_settings(scheduler.state_dict()),
                                 "model.lr_scheduler")
        if changed:
            name, old, new = changed[0]
            raise ResumeRefused(f"{name} is {new!r} but the checkpoint was trained with {old!r}: the restored "
                                f"schedule would override it; {_NEW_RUN}")
    base = getattr(scheduler, "base_lrs", None)
    changes = []
    for i, (old, new) in enumerate(zip(saved_groups, settings(optimizer))):
        if base is not None:  # with a scheduler the configured lr is its base lr
            old, new = {**old, "lr": old.get("initial_lr", old["lr"])}, {**new, "lr": base[i]}
        group = f"model.optimizer.param_groups.{i}" if len(saved_groups) > 1 else "model.optimizer"
        changes += option_changes({k: v for k, v in old.items() if k != "initial_lr"},
                                  {k: v for k, v in new.items() if k != "initial_lr"}, group)
    return changes


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: Any, configured: list[dict],
                             configured_base: list[float] | None) -> list[Change]:
    """Writes this run's configured hyper-parameters into a restored optimizer's param groups (the restore
    put the checkpoint's back). ``configured``: :func:`settings` of the freshly configured optimizer;
    ``configured_base``: its scheduler's ``base_lrs`` (None without a scheduler). With a scheduler the
    learning rate keeps its place in the schedule: the current lr scales with the base lr."""
    changes = []
    base_lrs = getattr(scheduler, "base_lrs", None)
    for i, (group, want) in enumerate(zip(optimizer.param_groups, configured)):
        if base_lrs is not None and configured_base is not None:
            old, new = base_lrs[i], configured_base[i]
            if not _same(old, new):
                changes.append(("lr", old, new))
                group["lr"] = group["lr"] * new / old if old else new
                base_lrs[i] = new
                if "initial_lr" in group:
                    group["initial_lr"] = new
                last = getattr(scheduler, "_last_lr", None)
                if last:
                    last[i] = group["lr"]
        elif not _same(group["lr"], want["lr"]):
            changes.append(("lr", group["lr"], want["lr"]))
            group["lr"] = want["lr"]
        for key, value in want.items():
            if key not in ("lr", "initial_lr") and key in group and not _same(group[key], value):
                changes.append((key, group[key], value))
                group[key] = value
    return changes


def describe(changes: list[Change]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)


_AVERAGING = "trainer.callbacks.AdapterEMA"
AVERAGING_FORMAT = "fact-adapter-ema"  # the ``format`` of AdapterEMA's state among a checkpoint's callbacks


def averaging_settings(state: dict | None) -> dict | None:
    """An EMA state's settings (decay, warm-up), or None for no state."""
    return {"decay": state.get("decay"), "warmup": state.get("warmup")} if state else None


def saved_averaging(checkpoint: dict) -> dict | None:
    """The settings of the EMA a checkpoint holds, or None when it was trained without one."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("format") == AVERAGING_FORMAT:
            return averaging_settings(state)
    return None


def averaging_changes(saved: dict | None, current: dict | None) -> list[Change]:
    """The EMA's changed settings between a checkpoint and this run (None: no EMA); all are applied."""
    if saved is None and current is None:
        return []
    if saved is None or current is None:
        return [(_AVERAGING, "on" if saved else "off", "on" if current else "off")]
    return option_changes(saved, current, _AVERAGING)


def check(checkpoint: dict, module, datamodule=None, callbacks=None) -> list[Change]:
    """The whole check of a resume, before anything is written: the base model (unless the module allows
    another), the model's, optimizer's and scheduler's refusals; returns the changes the run applies.
    ``callbacks``: the trainer's, for the EMA's changes (its settings come from a callback's ``settings()``)."""
    base, saved_base = module.base_spec.describe(), (checkpoint.get("fact") or {}).get("base")
    if module.hparams.check_base_on_resume and saved_base not in (None, base):
        raise ResumeRefused(f"model.base is {base!r} but the checkpoint was trained on {saved_base!r}: resume with "
                            "the same base, or pass --model.check_base_on_resume false to go on anyway")
    applied = refuse_model_changes(checkpoint.get("hyper_parameters") or {}, dict(module.hparams))
    applied += refuse_optimizer_changes(checkpoint, module.optimizer_factory, module.scheduler_factory)
    if datamodule is not None:
        applied += option_changes(checkpoint.get("datamodule_hyper_parameters") or {}, dict(datamodule.hparams), "data")
    if callbacks is not None:
        averaging = [c for c in callbacks if type(c).__name__ == "AdapterEMA"]
        applied += averaging_changes(saved_averaging(checkpoint), averaging[0].settings() if averaging else None)
    return applied


class CheckpointMismatch(UserError, RuntimeError):
    """The checkpoint's weights are not this adapter's (another model's checkpoint)."""


def saved_state_keys(path) -> dict[str, None]:
    """The weight names a checkpoint file holds (memory-mapped: no tensor is read)."""
    return dict.fromkeys(torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("state_dict") or {})


def check_checkpoint(checkpoint: dict, hparams: dict, adapter_keys: set[str], base: str) -> dict:
    """Refuses a checkpoint this run cannot continue (a newer format, other options, another adapter's keys,
    another base model unless ``check_base_on_resume`` is off); returns its ``fact`` record."""
    meta = checkpoint.get("fact") or {}
    if meta.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointMismatch(f"checkpoint version {meta.get('version')} is newer than this fact-lightning "
                                 f"({CHECKPOINT_VERSION}): update fact-lightning to resume it")
    refuse_model_changes(checkpoint.get("hyper_parameters") or {}, hparams)
    got = set(checkpoint.get("state_dict", {}))
    if got != adapter_keys:
        raise CheckpointMismatch(
            f"the checkpoint does not match the adapter: missing {sorted(adapter_keys - got)[:5]}, unexpected "
            f"{sorted(got - adapter_keys)[:5]} (a checkpoint of another model?)")
    if hparams.get("check_base_on_resume", True) and meta.get("base") not in (None, base):
        raise UserError(f"the checkpoint was trained on base model {meta['base']!r}, this run uses {base!r}; "
                        "resume with the same base, or pass --model.check_base_on_resume false to go on anyway")
    return meta

"""Host-to-device copies inside a training step, found without a GPU.

On a GPU, a tensor made on the host and moved with a blocking ``.to(device)`` (``non_blocking=False``, or
pageable memory) makes the host wait until the device has drained its queue: the host cannot run ahead and
queue the next kernels, and each such copy in a step leaves the GPU idle for a while. ``HostCopyCounter`` is a
``TorchFunctionMode`` that finds these copies on any device:

- on a GPU it reads where tensors are: a copy is a move from the CPU to the device;
- on the CPU every tensor is on the host, so it tracks where each tensor *would* be on a GPU: the tensors it is
  told are on the device (parameters, buffers, the batch), the outputs of every op with an input there, the
  results of factories given a ``device``, and moves (``.to(device)``, ``.to(tensor on the device)``,
  ``.cuda()``). A tensor made without a device (``torch.tensor(...)``, draws from a CPU generator, a
  tokenizer's ids, ``torch.from_numpy``) and ops on such tensors only stay on the host.

A copy is counted as blocking unless it is asked for with ``non_blocking=True`` from pinned memory (on the CPU,
where nothing can be pinned, ``non_blocking=True`` is taken as the intent). ``torch.tensor(data, device=...)``
from Python data is always a blocking copy. Reads of a device tensor on the host (``.item()``, ``.tolist()``,
``bool()``, ``.cpu()``...) are the other direction, listed as ``syncs``.

Limits of the CPU tracking: an explicit ``.to("cpu")`` cannot be told from a move to the model's device (both are
the CPU) and counts as the latter; tensors made before the counter starts are on the host unless marked
(parameters, buffers and the batch are marked by the caller; a tensor an earlier step moved, such as a noise
schedule's table, is known once the counter has seen that step, hence counting from a second step).
"""

from __future__ import annotations

import linecache
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

PROJECT = Path(__file__).resolve().parents[1] / "fact_lightning"
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


@dataclass(frozen=True)
class Event:
    """One copy (or host read): where in the project it happened, and what."""

    step: int
    op: str
    shape: tuple[int, ...]
    non_blocking: bool
    site: str    # the innermost frame in fact_lightning/ (file:line function: code)
    caller: str  # the innermost frame outside torch and this file

    def __str__(self) -> str:
        mode = "non_blocking" if self.non_blocking else "blocking"
        return f"step {self.step}: {self.op} {list(self.shape)} ({mode}) at {self.site}" + (
            f" [via {self.caller}]" if self.caller != self.site else "")


class HostCopyCounter(TorchFunctionMode):
    """Records host-to-device copies and device-to-host reads of the torch calls made while it is active.

    Args:
        device: the model's device (on ``cpu``, device placement is tracked as described in the module doc).
        on_device: tensors already on the device (parameters, buffers, the batch); more with ``mark``.
    Enter it once per step (``with counter.at_step(i):``); what it learnt of placement carries over.
    """

    def __init__(self, device: torch.device | str, on_device: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.device = torch.device(device)
        self.tracking = self.device.type == "cpu"
        self._placed = WeakIdKeyDictionary()
        self.copies: list[Event] = []
        self.syncs: list[Event] = []
        self.step = 0
        self.mark(on_device)

    def at_step(self, step: int) -> HostCopyCounter:
        self.step = step
        return self

    def mark(self, tensors: Iterable[object]) -> None:
        """Declares tensors (in any nesting of lists, tuples and dicts) to be on the device."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._placed[t] = True

    def on_device(self, t: torch.Tensor) -> bool:
        return t in self._placed if self.tracking else t.device.type != "cpu"

    def blocking(self, step: int | None = None) -> list[Event]:
        return [e for e in self.copies if not e.non_blocking and (step is None or e.step == step)]

    # -- the mode ------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MOVES:
            return self._move(func, args, kwargs)
        flat = tree_flatten((args, kwargs))[0]
        inputs = [t for t in flat if isinstance(t, torch.Tensor)]
        if func in _HOST_READS:
            out = func(*args, **kwargs)
            if inputs and self.on_device(inputs[0]):
                self.syncs.append(self._event(func, inputs[0].shape, False))
            if self.tracking and inputs and out is inputs[0]:  # .cpu() on the CPU: a new object for the host copy
                out = out.view_as(out)
            return out
        if func is torch.Tensor.copy_ and len(inputs) >= 2 and self.on_device(inputs[0]) \
                and not self.on_device(inputs[1]):
            non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            self._record_copy(func, inputs[1], non_blocking and (self.tracking or inputs[1].is_pinned()))
        out = func(*args, **kwargs)
        if not self.tracking:
            if func in _DATA_FACTORIES and kwargs.get("device") is not None and not inputs \
                    and torch.device(kwargs["device"]).type != "cpu":
                self.copies.append(self._event(func, getattr(out, "shape", ()), False))
            return out
        if not inputs:  # a factory: on the device only when given one
            if kwargs.get("device") is not None:
                self.mark(out)
                if func in _DATA_FACTORIES:  # Python data -> the device: a blocking copy
                    self.copies.append(self._event(func, getattr(out, "shape", ()), False))
        elif any(self.on_device(t) for t in inputs):
            ids = {id(t) for t in inputs if not self.on_device(t)}
            self.mark([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and id(t) not in ids])
        return out

    def _move(self, func, args, kwargs):
        src = args[0]
        non_blocking = bool(kwargs.get("non_blocking", False))
        to_device = func is torch.Tensor.cuda or kwargs.get("device") is not None
        for a in (*args[1:], kwargs.get("other")):
            if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
                to_device = True
            elif isinstance(a, torch.Tensor):
                to_device = to_device or self.on_device(a)
            elif isinstance(a, bool):
                non_blocking = a  # to(device, dtype, non_blocking) / to(other, non_blocking)
        out = func(*args, **kwargs)
        if not self.tracking:
            if src.device.type == "cpu" and out.device.type != "cpu":
                self._record_copy(func, src, non_blocking and src.is_pinned())
            return out
        if not to_device:
            if self.on_device(src):
                self.mark(out)
            return out
        if not self.on_device(src):
            self._record_copy(func, src, non_blocking)
            if out is src:  # a no-op on the CPU: a new tensor object stands for the device copy
                out = out.view_as(out)
        self.mark(out)
        return out

    def _record_copy(self, func, src: torch.Tensor, non_blocking: bool) -> None:
        self.copies.append(self._event(func, src.shape, non_blocking))

    def _event(self, func, shape, non_blocking: bool) -> Event:
        here = str(Path(__file__).resolve())
        outside = [f for f in traceback.extract_stack() if str(Path(f.filename).resolve()) != here
                   and "/torch/" not in f.filename]
        project = [f for f in outside if str(PROJECT) in str(Path(f.filename).resolve())]
        return Event(self.step, _name(func), tuple(shape), non_blocking,
                     _where(project[-1]) if project else "?", _where(outside[-1]) if outside else "?")


def _name(func) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
    return qual.replace("TensorBase.", "Tensor.") if "." in qual else f"torch.{qual}"


def _where(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename).resolve()
    root = PROJECT.parent
    shown = path.relative_to(root) if path.is_relative_to(root) else Path(*path.parts[-3:])
    code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
    return f"{shown}:{frame.lineno} {frame.name}: {code}"


def report(events: list[Event]) -> str:
    return "\n".join(str(e) for e in events) or "(none)"

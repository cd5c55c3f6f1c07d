"""Bookkeeping of non-finite steps on the device, so that the hot path needs no host synchronisation."""

from __future__ import annotations

import torch

from ..errors import UserError


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the run stops with an error and exports nothing."""


class NonFiniteTracker:
    """Counts skipped (non-finite) steps and the longest run of consecutive ones, as device tensors.

    ``update`` is a few tensor ops per step; ``collect`` is the one host sync, made when the caller wants
    the numbers (at logging steps, or at once when it synchronises anyway).
    """

    def __init__(self) -> None:
        self._skipped: torch.Tensor | None = None  # since the last collect
        self._consecutive: torch.Tensor | None = None  # the current run of non-finite steps
        self._worst: torch.Tensor | None = None  # the longest run since the last collect

    def update(self, finite: torch.Tensor) -> None:
        """``finite``: a 0-d float tensor, 1 for a finite step, 0 for a skipped one."""
        bad = 1.0 - finite.detach().float()
        if self._skipped is None:
            self._skipped, self._consecutive, self._worst = bad.clone(), bad.clone(), bad.clone()
            return
        self._skipped = self._skipped + bad
        self._consecutive = (self._consecutive + 1.0) * bad
        self._worst = torch.maximum(self._worst, self._consecutive)

    def collect(self) -> tuple[int, int]:
        """(steps skipped since the last collect, longest consecutive run in that span, the current run
        included); the current run carries over so that a run spanning two collects counts whole."""
        if self._skipped is None:
            return 0, 0
        skipped, worst = int(self._skipped.item()), int(self._worst.item())
        self._skipped = torch.zeros_like(self._skipped)
        self._worst = self._consecutive.clone()
        return skipped, worst

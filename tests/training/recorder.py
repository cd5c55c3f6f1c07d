"""A test callback: each rank writes the sample keys of the batches it trained on (multi-process tests)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl


class RecordKeys(pl.Callback):
    def __init__(self, out: str):
        self.out = out
        self.keys: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.append(list(batch["key"]))

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(self.out) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "node_rank": trainer.node_rank,
                                    "global_rank": trainer.global_rank, "keys": self.keys}))

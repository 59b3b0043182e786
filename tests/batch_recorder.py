"""A callback for the CLI tests (config target ``batch_recorder.RecordBatchKeys``, with ``tests/`` on PYTHONPATH):
one JSON line per training batch and rank with the step it trains and the keys of its samples."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl


class RecordBatchKeys(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        line = {"pid": os.getpid(), "step": trainer.global_step, "keys": list(batch["key"])}
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(line) + "\n")


def read_records(path: Path, rank: int = 0) -> list[dict]:
    """The complete lines written for ``rank`` so far (a killed run may have left a partial last one)."""
    try:
        lines = Path(f"{path}.rank{rank}").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def recorder_override(path: Path) -> list[str]:
    return ["lightning.callbacks.keys.target=batch_recorder.RecordBatchKeys",
            f"lightning.callbacks.keys.params.path={path}"]

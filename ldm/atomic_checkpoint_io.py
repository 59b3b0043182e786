"""Checkpoint writes that never leave a partial file: a temporary file in the checkpoint's own folder, fsynced,
then renamed over the target.

Why not Lightning's default: it writes through an fsspec transaction, whose local files are staged in the
system temp folder and then *moved*; when that is another filesystem the move is a copy, so a full disk during
it leaves a truncated ``last.ckpt``. A rename within one folder is atomic: the old checkpoint stays whole until
the new one is complete.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: its own client gives its own guarantees
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

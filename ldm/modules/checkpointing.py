"""Activation checkpointing, one rule for every network (the LiteVAE encoder's UNets, the stage-2 UNet's blocks):
recompute a part's activations in backward instead of storing them, only when asked and only when a backward will
come (under ``no_grad`` there is nothing to save)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """``fn(*args)``, under non-reentrant activation checkpointing when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Checkpointed(nn.Module):
    """A block whose ``_forward`` runs under activation checkpointing when ``use_checkpoint`` is set and training."""

    use_checkpoint: bool = False

    def forward(self, *args: Any) -> Any:
        return maybe_checkpoint(self._forward, *args, enabled=self.use_checkpoint and self.training)

"""Exponential moving average of a module's weights, kept as a frozen copy of the module.

A full copy (rather than LDM's name-mangled buffers) means the EMA model is used exactly like the
live one (``ema.module(x)``), lands in the Lightning checkpoint under ``<attr>.module.*`` for exact
resume, and exports without key renaming.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``shadow ← decay·shadow + (1 − decay)·live`` once per optimizer step (never per micro-batch).

    With ``warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        shadow = [p for p in self.module.parameters()]
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(shadow, live, weight)
        for b_shadow, b_live in zip(self.module.buffers(), model.buffers()):
            b_shadow.copy_(b_live)  # buffers (e.g. spectral-norm vectors) are copied, not averaged
        self.num_updates += 1

    def update_after_each_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The one EMA hook of both stages: ``self.update(model)`` right after every ``optimizer.step()``.

        Tied to the torch optimizer rather than to a loop hook, so it runs once per optimizer step whatever the
        loop (manual or automatic optimisation, gradient accumulation), and before any callback's
        ``on_train_batch_end``: a checkpoint saved there already holds this step's EMA, so resume is exact.
        """
        optimizer.register_step_post_hook(lambda *_: self.update(model))

    def train(self, mode: bool = True) -> "EMA":
        # The shadow model always stays in eval mode (dropout off), whatever the parent does.
        super().train(mode)
        self.module.eval()
        return self

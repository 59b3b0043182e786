"""Conditioning for the stage-2 UNet: batches and sampling requests → UNet keyword arguments.

Modes: ``none`` (unconditional), ``class`` (``y``, null label = ``num_classes``) and ``text`` (``context``
from a frozen text encoder, null prompt ``""``). Classifier-free-guidance dropout replaces the condition by
the null one with probability ``drop_prob`` during training only.

The text encoder is frozen and kept outside the LightningModule's module tree (like the first stage): its
weights come from its own file, so they never enter stage-2 checkpoints, optimizers or DDP buckets.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.modules.conditioners import NULL_TEXT, drop_labels, drop_texts

MODES = ("none", "class", "text")
Cond = dict[str, torch.Tensor]


class Conditioning:
    """Builds ``{"y": labels}`` / ``{"context": features}`` / ``{}`` for the UNet."""

    def __init__(self, mode: str, num_classes: int | None = None, text_encoder: nn.Module | None = None,
                 drop_prob: float = 0.1, label_key: str = "cls", text_key: str = "txt"):
        if mode not in MODES:
            raise ValueError(f"conditioning must be one of {MODES}, got {mode!r}")
        if mode == "class" and num_classes is None:
            raise ValueError("conditioning='class' needs a class-conditional UNet (unet_config.params.num_classes)")
        if mode == "text" and text_encoder is None:
            raise ValueError("conditioning='text' needs text_encoder_config (e.g. ldm.modules.conditioners."
                             "OpenCLIPTextEncoder)")
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {drop_prob}")
        self.mode, self.num_classes, self.drop_prob = mode, num_classes, drop_prob
        self.text_encoder, self.label_key, self.text_key = text_encoder, label_key, text_key

    # ----------------------------------------------------------------------------------- training
    def from_batch(self, batch: Mapping[str, Any], device: torch.device, dropout: bool = False,
                   generator: torch.Generator | None = None) -> Cond:
        """The batch's condition; with ``dropout`` some are replaced by the null condition (CFG training)."""
        p = self.drop_prob if dropout else 0.0
        if self.mode == "class":
            if self.label_key not in batch:
                raise KeyError(f"class conditioning: the batch has no '{self.label_key}' labels "
                               f"(keys: {sorted(batch)})")
            y = torch.as_tensor(batch[self.label_key]).long().to(device)
            return {"y": drop_labels(y, p, self.num_classes, generator) if p > 0 else y}
        if self.mode == "text":
            if self.text_key not in batch:
                raise KeyError(f"text conditioning: the batch has no '{self.text_key}' captions (keys: {sorted(batch)})")
            texts = list(batch[self.text_key])
            return {"context": self.encode_text(drop_texts(texts, p, generator) if p > 0 else texts, device)}
        return {}

    def encode_text(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        encoder = self.text_encoder
        if next(encoder.parameters()).device != device:
            encoder.to(device)
        with torch.no_grad():
            return encoder(list(texts))

    # ----------------------------------------------------------------------------------- sampling
    def for_sampling(self, n: int, device: torch.device, labels: Sequence[int] | torch.Tensor | None = None,
                     texts: Sequence[str] | None = None) -> tuple[Cond, Cond | None]:
        """``(cond, uncond)`` for ``n`` samples; ``uncond`` is None for unconditional models."""
        if self.mode == "class":
            if labels is None:
                raise ValueError("a class-conditional model needs labels to sample")
            y = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(n)
            return {"y": y}, {"y": torch.full_like(y, self.num_classes)}
        if self.mode == "text":
            if texts is None or len(texts) != n:
                raise ValueError(f"a text-conditional model needs {n} prompts to sample")
            context = self.encode_text(list(texts) + [NULL_TEXT] * n, device)
            return {"context": context[:n]}, {"context": context[n:]}
        return {}, None

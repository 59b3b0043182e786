"""First-stage encode/decode under reduced-precision autocast, never returning NaN/inf silently.

fp16 has a largest value of 65504: an autoencoder trained in fp32/bf16 can overflow in it on some inputs
(large activations in the decoder's upsampling path are the usual culprit), and the result is then inf or NaN
without any error. ``GuardedAutoencoder`` runs each call under the requested autocast, checks the output and,
for fp16 only, recomputes a non-finite batch in fp32 and warns once (per wrapper). bf16 has fp32's exponent
range, so it is not checked and never recomputed. The fallback is fp32 rather than bf16: a rare batch is
redone, and there accuracy matters more than speed.

The wrapper has the autoencoder API (``encode(x) -> posterior``, ``decode(z) -> x``, ``downsample_factor``),
so it composes with ``ldm.tiling.TiledAutoencoder`` (each tile is guarded on its own) and works for any first
stage that has that API.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``"bf16"`` / ``"fp16"``; for ``"fp32"`` a context that turns autocast off, so
    that an outer autocast (e.g. the UNet's) does not leak into the first stage."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=_DTYPES[precision])


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class GuardedAutoencoder:
    """``model``'s encode/decode under ``precision`` autocast; fp16 outputs that are not finite are redone in fp32."""

    def __init__(self, model: Any, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model, self.precision = model, precision
        self.fallbacks = 0  # batches recomputed in fp32 (the warning is given for the first only)

    @property
    def downsample_factor(self) -> int:
        return int(self.model.downsample_factor)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Any:
        return self._run(self.model.encode, x, lambda p: _finite(p.mean, p.std), "encode")

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.decode, z, _finite, "decode")

    def _run(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor, ok: Callable[[Any], bool], what: str) -> Any:
        with autocast(x.device.type, self.precision):
            out = fn(x)
        if self.precision != "fp16" or ok(out):
            return out
        self.fallbacks += 1
        if self.fallbacks == 1:
            log.warning("fp16 %s of a batch of shape %s gave NaN/inf (fp16 overflow): recomputed in fp32; later "
                        "batches that overflow are recomputed without another warning", what, tuple(x.shape))
        with autocast(x.device.type, "fp32"):
            return fn(x.float())

"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper."""
from __future__ import annotations

from typing import Callable, Mapping

import torch


def cfg_model(model: Callable[..., torch.Tensor], cond: Mapping[str, torch.Tensor],
              uncond: Mapping[str, torch.Tensor], scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``f(x_t, t) = u + scale·(c - u)`` with c = model(x_t, t, **cond), u = model(x_t, t, **uncond).

    Both branches run in ONE forward pass on the concatenated batch [cond; uncond], which is faster than
    two passes and keeps batch-statistics-free models exactly equivalent. ``cond`` and ``uncond`` must
    have the same keys, each tensor batched like ``x_t``. Guidance is linear, so it applies equally to eps
    and v outputs.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} != uncond keys {sorted(uncond)}")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kwargs = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        out_c, out_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **kwargs).chunk(2)
        return out_u + scale * (out_c - out_u)

    return guided

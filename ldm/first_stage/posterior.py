"""The posterior of a deterministic encoder (DC-AE, TAESD): a point mass at its latent."""
from __future__ import annotations

import torch

# log(0) is -inf; the floor LDM and diffusers clamp log-variances to keeps code that blends or averages
# log-variances (tiled encoding) finite, and exp(0.5 * LOGVAR_FLOOR) ~ 3e-7 is zero for every practical use.
LOGVAR_FLOOR = -30.0


class PointPosterior:
    """``encode(x)``'s API for an encoder without a variance: ``std`` 0, so ``sample()`` is ``mode()``."""

    def __init__(self, z: torch.Tensor):
        self.mean = z
        self.std = torch.zeros_like(z)
        self.var = self.std
        self.logvar = torch.full_like(z, LOGVAR_FLOOR)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """Zero per sample, as diffusers' deterministic posterior: such an encoder was trained without a KL term."""
        return self.mean.new_zeros(self.mean.shape[0])

"""Diagonal Gaussian posterior q(z|x) (the LDM ``DiagonalGaussianDistribution`` interface)."""
from __future__ import annotations

import torch


class DiagonalGaussian:
    """Gaussian with per-element mean and variance, built from ``moments = cat([mean, logvar], dim=1)``.

    Statistics are kept in fp32 even under autocast: ``exp(logvar)`` and the KL overflow or lose
    precision in bf16/fp16.
    """

    LOGVAR_RANGE = (-30.0, 20.0)  # as in LDM/SD; keeps exp() finite

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(*self.LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std·ε`` (differentiable w.r.t. mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) in closed form, summed over C, H, W: one value per sample."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

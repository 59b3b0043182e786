"""The posterior every first stage's ``encode(x)`` returns (docs/internals.md): a diagonal Gaussian q(z|x).

One class for all encoders: ours (``DiagonalGaussian`` builds it from the network's moments, clamping the log-variance),
tiled encodes (``ldm.tiling`` blends mean, log-variance and std), and deterministic encoders (DC-AE, TAESD:
``PointPosterior``, std 0).
"""
from __future__ import annotations

import torch

# log(0) is -inf; the floor LDM and diffusers clamp log-variances to keeps code that blends or averages
# log-variances (tiled encoding) finite, and exp(0.5 * LOGVAR_FLOOR) ~ 3e-7 is zero for every practical use.
LOGVAR_FLOOR = -30.0
LOGVAR_RANGE = (LOGVAR_FLOOR, 20.0)  # the clamp of LDM/SD on a network's log-variance: keeps exp() finite


class GaussianPosterior:
    """``mean``, ``logvar``, ``std``, ``var``, ``sample()``, ``mode()``, ``kl()``. ``std`` defaults to
    ``exp(logvar / 2)``; it is given explicitly where it is not derived from ``logvar`` (a blend of stds, or a
    deterministic encoder's exact zero)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, std: torch.Tensor | None = None):
        self.mean, self.logvar = mean, logvar
        self.std = torch.exp(0.5 * logvar) if std is None else std
        self.var = torch.exp(logvar) if std is None else std.square()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std·ε`` (differentiable w.r.t. mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) in closed form, summed over C, H, W: one value per sample."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class PointPosterior(GaussianPosterior):
    """An encoder without a variance: std 0, so ``sample()`` is ``mode()``."""

    def __init__(self, z: torch.Tensor):
        super().__init__(z, torch.full_like(z, LOGVAR_FLOOR), torch.zeros_like(z))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """Zero per sample, as diffusers' deterministic posterior: such an encoder was trained without a KL term."""
        return self.mean.new_zeros(self.mean.shape[0])


class DiagonalGaussian(GaussianPosterior):
    """Gaussian with per-element mean and variance, built from ``moments = cat([mean, logvar], dim=1)`` (the LDM
    ``DiagonalGaussianDistribution`` interface), the log-variance clamped to ``LOGVAR_RANGE``.

    Statistics are kept in fp32 even under autocast: ``exp(logvar)`` and the KL overflow or lose precision in
    bf16/fp16.
    """

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.float().chunk(2, dim=1)
        super().__init__(mean, logvar.clamp(*LOGVAR_RANGE))

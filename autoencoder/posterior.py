"""Diagonal Gaussian posterior q(z|x) (the LDM ``DiagonalGaussianDistribution`` interface) from the network's moments."""
from __future__ import annotations

import torch

from ldm.first_stage.posterior import GaussianPosterior


class DiagonalGaussian(GaussianPosterior):
    """Gaussian with per-element mean and variance, built from ``moments = cat([mean, logvar], dim=1)``.

    Statistics are kept in fp32 even under autocast: ``exp(logvar)`` and the KL overflow or lose
    precision in bf16/fp16.
    """

    LOGVAR_RANGE = (-30.0, 20.0)  # as in LDM/SD; keeps exp() finite

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.float().chunk(2, dim=1)
        super().__init__(mean, logvar.clamp(*self.LOGVAR_RANGE))

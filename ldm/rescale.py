"""Down-scaling an image and its latent alike: the operation behind scale equivariance (EQ-VAE, Kouzelis et al.
2025), shared by the stage-1 regulariser (autoencoder/lightning.py) and the equivariance probe."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def downscale(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Antialiased bilinear resize to ``size`` (float32 out)."""
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)


def scaled_sizes(latent_hw: Sequence[int], image_hw: Sequence[int], factor: float
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Latent and image sizes after down-scaling by ``factor``: the latent side rounds, the image side follows
    from the autoencoder's own down-sampling factor so that decoding the small latent gives the small image."""
    small = (max(1, round(latent_hw[0] / factor)), max(1, round(latent_hw[1] / factor)))
    ratio = (image_hw[0] // latent_hw[0], image_hw[1] // latent_hw[1])
    return small, (small[0] * ratio[0], small[1] * ratio[1])

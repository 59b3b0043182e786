"""MMD² between latents and N(0, I) with RBF kernels (LiteVAE paper, Table 6).

Convention (the paper gives only "RBF kernel with bandwidth σ", σ ∈ {25, 50, 100, 250, 500}): each sample is
flattened to a vector, k(a, b) = exp(−‖a − b‖² / (2σ²)) with σ in the units of that Euclidean distance
(for a 4×32×32 latent two N(0, I) samples are ≈ √(2·4096) ≈ 90 apart, so these σ span the relevant scales),
and the unbiased estimator (diagonals of K_XX and K_YY excluded). The paper's absolute numbers
(e.g. 8.67 for SD-VAE at σ=25) are on an unstated scale, so compare encoders with each other, not with them.
"""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_BANDWIDTHS = (25.0, 50.0, 100.0, 250.0, 500.0)


def _kernel_sums(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float], same: bool,
                 chunk_size: int) -> torch.Tensor:
    """Σ_ij k_σ(a_i, b_j) for every σ, excluding i == j when ``same``; rows processed in chunks."""
    inv_two_var = torch.tensor([1.0 / (2.0 * s * s) for s in bandwidths], dtype=a.dtype, device=a.device)
    b_sq = (b * b).sum(dim=1)
    total = torch.zeros(len(bandwidths), dtype=a.dtype, device=a.device)
    for start in range(0, len(a), chunk_size):
        rows = a[start:start + chunk_size]
        d2 = ((rows * rows).sum(dim=1, keepdim=True) + b_sq - 2 * rows @ b.T).clamp_min(0)
        k = torch.exp(-d2.unsqueeze(0) * inv_two_var.view(-1, 1, 1))
        if same:  # drop the i == j terms (the unbiased estimator)
            idx = torch.arange(len(rows), device=a.device)
            k[:, idx, idx + start] = 0
        total += k.sum(dim=(1, 2))
    return total


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
            chunk_size: int = 512) -> dict[float, float]:
    """Unbiased MMD² between samples ``x`` (n, ...) and ``y`` (m, ...) for each RBF bandwidth, in float64."""
    x = x.detach().flatten(1).double()
    y = y.detach().flatten(1).double().to(x.device)
    n, m = len(x), len(y)
    if n < 2 or m < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need >= 2 samples of equal dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    k_xx = _kernel_sums(x, x, bandwidths, True, chunk_size) / (n * (n - 1))
    k_yy = _kernel_sums(y, y, bandwidths, True, chunk_size) / (m * (m - 1))
    k_xy = _kernel_sums(x, y, bandwidths, False, chunk_size) / (n * m)
    values = k_xx + k_yy - 2 * k_xy
    return {float(s): float(v) for s, v in zip(bandwidths, values.tolist())}


def mmd_to_standard_normal(latents: torch.Tensor, n: int | None = None, seed: int = 0,
                           bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> dict[float, float]:
    """MMD² between ``latents`` (N, C, H, W) and ``n`` (default N) seeded N(0, I) draws of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn((n or len(latents), *latents.shape[1:]), generator=generator, dtype=torch.float64)
    return mmd_rbf(latents, reference.to(latents.device), bandwidths)

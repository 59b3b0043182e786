"""PSNR / SSIM for images in [-1, 1] (the autoencoder convention), as thin torchmetrics wrappers.

PSNR is shift-invariant, so ``data_range=2`` on [-1, 1] equals PSNR on [0, 1] with range 1 (and on
[0, 255] with range 255). SSIM is *not* shift-invariant (its luminance term uses the means), so
``ssim`` maps images to [0, 1] first, which is what LDM-style evaluation and the published tables use.
Both are computed in fp32 regardless of the input dtype (bf16 would cost ~0.1 dB of PSNR).
"""
from __future__ import annotations

from typing import Literal

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

Reduction = Literal["none", "mean"]


def _prepare(x: torch.Tensor, y: torch.Tensor, clamp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two NCHW tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.detach().float(), y.detach().float()
    if clamp:  # decoders overshoot [-1, 1]; saved images are clipped, so metrics should be too
        x, y = x.clamp(-1, 1), y.clamp(-1, 1)
    return x, y


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, clamp: bool = True,
         reduction: Reduction = "none") -> torch.Tensor:
    """Per-image PSNR in dB, shape (N,) (or its mean with ``reduction="mean"``). Inputs NCHW in [-1, 1]."""
    x, y = _prepare(x, y, clamp)
    values = peak_signal_noise_ratio(x, y, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return _reduce(values, reduction)


def ssim(x: torch.Tensor, y: torch.Tensor, clamp: bool = True, reduction: Reduction = "none") -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) on images mapped from [-1, 1] to [0, 1], shape (N,)."""
    x, y = _prepare(x, y, clamp)
    values = structural_similarity_index_measure((x + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none")
    return _reduce(values, reduction)



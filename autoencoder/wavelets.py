"""Fast 2-D Haar wavelet transform (the fixed front end of LiteVAE and its wavelet loss).

Why our own: ``ptwt.wavedec2`` is a generic filter-bank implementation (padding + strided conv2d per
level, one full decomposition per call); the LiteVAE pseudocode calls it three times per image. For
Haar on even sizes the transform is just sums and differences of 2×2 pixel blocks, which plain
reshapes compute several times faster, in one pass for all levels. The tests check every band
against ``ptwt.wavedec2`` / PyWavelets.

Conventions (spec §1.1, App. G):

* ``haar_dwt(x, l)`` is ``cat([LL, H, V, D], dim=1) / 2**l`` where ``LL`` and ``(H, V, D)`` are the
  coarsest approximation and the coarsest detail tuple of ``ptwt.wavedec2(x, "haar", level=l)``.
  Channels are band-major: C channels of LL, then C channels of each detail band.
* The ``/2**l`` makes LL the local mean over 2^l × 2^l blocks (image range). With this scaling each
  level is one step of ``(±a ± b ± c ± d) / 4`` applied to the previous level's (scaled) LL.
* Everything runs in fp32 (fp64 stays fp64), with autocast disabled, and is differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    # bf16/fp16 (and integer images) are upcast to fp32; fp64 is kept so gradcheck works.
    return torch.promote_types(x.dtype, torch.float32)


def _check_input(x: Tensor, level: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    factor = 2**level
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"Haar DWT with level={level} needs H and W divisible by {factor}, got {h}x{w}")


def _haar_step(x: Tensor) -> Tensor:
    """One level on a (scaled) approximation: (B, C, H, W) -> (B, 4C, H/2, W/2) as [LL, H, V, D] / 2."""
    b, c, h, w = x.shape
    blocks = x.reshape(b, c, h // 2, 2, w // 2, 2)
    top, bottom = blocks[:, :, :, 0], blocks[:, :, :, 1]  # (B, C, h, w, 2): pixels (a, b) and (c, d)
    row_sum, row_diff = top + bottom, top - bottom  # (a+c, b+d) and (a-c, b-d)
    ll = row_sum[..., 0] + row_sum[..., 1]  # a + b + c + d
    horizontal = row_diff[..., 0] + row_diff[..., 1]  # a + b - c - d
    vertical = row_sum[..., 0] - row_sum[..., 1]  # a - b + c - d
    diagonal = row_diff[..., 0] - row_diff[..., 1]  # a - b - c + d
    return torch.cat([ll, horizontal, vertical, diagonal], dim=1) * 0.25


def haar_dwt_pyramid(x: Tensor, levels: int = 3) -> list[Tensor]:
    """``[haar_dwt(x, l) for l in 1..levels]`` computed in one pass (each level reuses the previous LL)."""
    _check_input(x, levels)
    channels = x.shape[1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        approx = x.to(_compute_dtype(x))
        outputs = []
        for _ in range(levels):
            coeffs = _haar_step(approx)
            outputs.append(coeffs)
            approx = coeffs[:, :channels]
    return outputs


def haar_dwt(x: Tensor, level: int = 1) -> Tensor:
    """Level-``level`` Haar sub-bands ``[LL, H, V, D] / 2**level``: (B, C, H, W) -> (B, 4C, H/2^l, W/2^l)."""
    return haar_dwt_pyramid(x, level)[-1]


def haar_idwt(coeffs: Tensor, level: int = 1) -> Tensor:
    """Inverse of one level: ``haar_idwt(haar_dwt(x, 1), 1) == x``.

    For ``level > 1`` the result is the level-(l-1) approximation in the same normalisation, i.e.
    ``haar_dwt(x, level - 1)[:, :C]``. Because of the ``/2**l`` scaling the arithmetic is the same for
    every level, so ``level`` is only validated. Note: unlike the paper's ``idwt(...) * 2`` (ptwt's
    orthonormal inverse applied to /2-scaled bands), no extra factor is needed here.
    """
    if coeffs.ndim != 4 or coeffs.shape[1] % 4:
        raise ValueError(f"expected (B, 4C, H, W) Haar coefficients, got shape {tuple(coeffs.shape)}")
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    with torch.autocast(device_type=coeffs.device.type, enabled=False):
        ll, horizontal, vertical, diagonal = coeffs.to(_compute_dtype(coeffs)).chunk(4, dim=1)
        top_sum, bottom_sum = ll + horizontal, ll - horizontal
        top_diff, bottom_diff = vertical + diagonal, vertical - diagonal
        top = torch.stack([top_sum + top_diff, top_sum - top_diff], dim=-1)  # pixels a, b
        bottom = torch.stack([bottom_sum + bottom_diff, bottom_sum - bottom_diff], dim=-1)  # pixels c, d
        b, c, h, w = ll.shape
        return torch.stack([top, bottom], dim=3).reshape(b, c, 2 * h, 2 * w)

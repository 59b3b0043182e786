"""Fast 2-D Haar wavelet transform (the fixed front end of LiteVAE and its wavelet loss).

Why our own: ``ptwt.wavedec2`` is a generic filter-bank implementation (padding + strided conv2d per
level, one full decomposition per call); the LiteVAE pseudocode calls it three times per image. For
Haar on even sizes the transform is just sums and differences of 2×2 pixel blocks, which plain
reshapes compute several times faster, in one pass for all levels. The tests check every band
against ``ptwt.wavedec2`` / PyWavelets.

Conventions (the paper's App. G ``HaarTransform``):

* ``haar_dwt(x, l)`` is ``cat([LL, H, V, D], dim=1) / 2**l`` where ``LL`` and ``(H, V, D)`` are the
  coarsest approximation and the coarsest detail tuple of ``ptwt.wavedec2(x, "haar", level=l)``.
  Channels are band-major: C channels of LL, then C channels of each detail band.
* The ``/2**l`` makes LL the local mean over 2^l × 2^l blocks (image range). With this scaling each
  level is one step of ``(±a ± b ± c ± d) / 4`` applied to the previous level's (scaled) LL.
* Everything runs in fp32 (fp64 stays fp64), with autocast disabled, and is differentiable.

Other wavelet families (``wavelet_dwt_pyramid`` / ``dwt_pyramid``, through ``ptwt``): any discrete
PyWavelets name (``db2``, ``sym4``, ``coif1``, ``bior2.2``, ...; list them with
``pywt.wavelist(kind="discrete")``) with a boundary mode from ``WAVELET_MODES``.

* Scaling: level l is divided by 2**l as for Haar. Every PyWavelets decomposition low-pass filter sums to
  sqrt(2), so LL has unit DC gain: a constant image gives LL equal to that constant, at every level.
* Sizes: with filter length L (``pywt.Wavelet(name).dec_len``), one level maps N to
  ``floor((N + L - 1) / 2)`` in the padding modes (``symmetric``, ``reflect``, ``zero``, ``constant``,
  ``periodic``), i.e. N/2 + L/2 - 1 for even N; each level works on the previous *full* LL (exactly
  ``pywt.wavedec2``), so the surplus grows per level: db2 (L=4) gives H/2+1, H/4+2, H/8+2; sym4 (L=8)
  H/2+3, H/4+5, H/8+6. ``dwt_pyramid`` centre-crops each level to the Haar size H/2^l x W/2^l
  (drops ``surplus // 2`` leading and the rest trailing rows/columns): the dropped coefficients are those
  whose filter support lies mostly in the padding; the kept ones have their support centres within half
  a coefficient spacing (2^(l-1) pixels at level l) of the Haar coefficient of the same index.
  ``periodization`` needs no crop: N/2 exactly, as PyWavelets (circular convolution, so top/bottom and
  left/right edges wrap into each other).
* For Haar every mode gives the same coefficients on even sizes, so ``dwt_pyramid(x, "haar", mode)`` is
  always the fast path.
"""
from __future__ import annotations

import ptwt
import pywt
import torch
from torch import Tensor

# PyWavelets mode names that ptwt pads natively, plus "periodization" (see _periodization_level).
WAVELET_MODES = ("symmetric", "reflect", "zero", "constant", "periodic", "periodization")


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


def discrete_wavelet(name: str, mode: str = "symmetric") -> pywt.Wavelet:
    """The PyWavelets wavelet called ``name``; a clear ValueError for unknown names or modes."""
    if mode not in WAVELET_MODES:
        raise ValueError(f"unknown wavelet mode {mode!r}; choose one of {list(WAVELET_MODES)}")
    try:
        return pywt.Wavelet(name)
    except ValueError as err:  # unknown name, or a continuous wavelet such as "morl"
        raise ValueError(f"unknown discrete wavelet {name!r} ({err}); valid names are listed by "
                         "`python -c \"import pywt; print(pywt.wavelist(kind='discrete'))\"`") from err


def _dwt_level(approx: Tensor, wavelet: pywt.Wavelet, mode: str) -> Tensor:
    """One unscaled level of ``pywt.dwt2``: (B, C, N, M) -> (B, 4C, n, m) as [LL, H, V, D]."""
    if mode == "periodization":
        return _periodization_level(approx, wavelet)
    ll, details = ptwt.wavedec2(approx, wavelet, mode=mode, level=1)
    return torch.cat([ll, *details], dim=1)


def _periodization_level(approx: Tensor, wavelet: pywt.Wavelet) -> Tensor:
    """PyWavelets ``periodization`` from ptwt's ``periodic`` mode (ptwt has no size-preserving mode).

    ``periodic`` coefficients are N/2-periodic, of length N/2 + L/2 - 1; PyWavelets samples the circular
    convolution at a phase shifted by L/2 - 1 input samples, so rolling the input back by that many
    samples and keeping the first period reproduces it exactly (tested for every wavelet with L <= 20).
    """
    shift = wavelet.dec_len // 2 - 1
    h, w = approx.shape[-2:]
    rolled = torch.roll(approx, shifts=(-shift, -shift), dims=(-2, -1))
    return _dwt_level(rolled, wavelet, "periodic")[..., : h // 2, : w // 2]


def wavelet_dwt_pyramid(x: Tensor, wavelet: str, levels: int = 3, mode: str = "symmetric") -> list[Tensor]:
    """Levels 1..``levels`` of ``pywt.wavedec2(x, wavelet, mode)`` through ptwt, as ``[LL, H, V, D] / 2**l``.

    Band-major channels like ``haar_dwt``; sizes follow PyWavelets (module docstring), no cropping.
    """
    _check_input(x, levels)
    filters = discrete_wavelet(wavelet, mode)
    channels = x.shape[1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        approx = x.to(_compute_dtype(x))
        outputs = []
        for level in range(1, levels + 1):
            coeffs = _dwt_level(approx, filters, mode)
            outputs.append(coeffs / 2**level)
            approx = coeffs[:, :channels]  # the next level transforms the full, unscaled LL (as pywt)
    return outputs


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top: top + height, left: left + width]


def dwt_pyramid(x: Tensor, wavelet: str = "haar", levels: int = 3, mode: str = "symmetric") -> list[Tensor]:
    """Like ``haar_dwt_pyramid`` (same channels and sizes H/2^l x W/2^l) for any discrete wavelet.

    Haar takes the fast path; other wavelets are centre-cropped to the Haar sizes (module docstring).
    """
    if wavelet == "haar":
        discrete_wavelet(wavelet, mode)  # validate the mode even though Haar ignores it
        return haar_dwt_pyramid(x, levels)
    h, w = x.shape[-2:]
    return [_center_crop(bands, h // 2**level, w // 2**level)
            for level, bands in enumerate(wavelet_dwt_pyramid(x, wavelet, levels, mode), start=1)]

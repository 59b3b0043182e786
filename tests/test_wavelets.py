"""The fast Haar DWT against ptwt / PyWavelets (the paper's App. G: [LL, H, V, D] of wavedec2(level=l) / 2**l)."""
import numpy as np
import ptwt
import pytest
import pywt
import torch

from autoencoder.wavelets import haar_dwt, haar_dwt_pyramid, haar_idwt


def ptwt_reference(x: torch.Tensor, level: int) -> torch.Tensor:
    """The App.-G HaarTransform: coarsest LL and coarsest detail tuple of wavedec2, band-major, / 2**l."""
    coeffs = ptwt.wavedec2(x.float(), pywt.Wavelet("haar"), level=level, mode="symmetric")
    return torch.cat([coeffs[0], *coeffs[1]], dim=1) / 2**level


SHAPES = [(1, 1, 8, 8), (2, 3, 16, 24), (3, 3, 32, 16), (2, 1, 24, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", [1, 2, 3])
def test_matches_ptwt(shape, level):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(level))
    out = haar_dwt(x, level)
    b, c, h, w = shape
    assert out.shape == (b, 4 * c, h // 2**level, w // 2**level)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ptwt_reference(x, level), atol=1e-5, rtol=1e-5)


def test_band_order_matches_pywt():
    """Band-major channel layout: [LL(C), cH(C), cV(C), cD(C)], checked against PyWavelets per channel."""
    x = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = haar_dwt(x, 2).numpy()
    for n in range(2):
        for ch in range(3):
            ll, (ch_h, ch_v, ch_d) = pywt.wavedec2(x[n, ch].numpy(), "haar", level=2)[:2]
            for band, ref in enumerate([ll, ch_h, ch_v, ch_d]):
                np.testing.assert_allclose(out[n, band * 3 + ch], ref / 4, atol=1e-10)


def test_bands_on_known_pattern():
    """A horizontal edge lands in H only, a vertical edge in V only, a checkerboard in D only."""
    rows = torch.tensor([1.0, -1.0]).repeat(4)[:, None].expand(8, 8)  # alternating rows
    cols = rows.T.contiguous()
    checker = rows * cols
    for img, band in [(rows, 1), (cols, 2), (checker, 3)]:
        out = haar_dwt(img[None, None].contiguous(), 1)[0]
        for k in range(4):
            expected = 1.0 if k == band else 0.0
            torch.testing.assert_close(out[k], torch.full((4, 4), expected))


def test_pyramid_equals_separate_calls():
    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))
    pyramid = haar_dwt_pyramid(x, 3)
    assert len(pyramid) == 3
    for level, out in enumerate(pyramid, start=1):
        torch.testing.assert_close(out, ptwt_reference(x, level), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, haar_dwt(x, level), atol=0, rtol=0)


def test_idwt_round_trip():
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(haar_idwt(haar_dwt(x, 1), 1), x, atol=1e-6, rtol=1e-6)
    # Inverting the level-2 tensor gives the (scaled) level-1 LL.
    torch.testing.assert_close(haar_idwt(haar_dwt(x, 2), 2), haar_dwt(x, 1)[:, :3], atol=1e-6, rtol=1e-6)


def test_idwt_matches_ptwt_waverec2():
    """Independent inverse: ptwt's orthonormal waverec2 of the unscaled bands."""
    coeffs = torch.randn(1, 12, 4, 6, generator=torch.Generator().manual_seed(3))
    ll, h, v, d = (2 * c for c in coeffs.chunk(4, dim=1))  # undo the /2 of level 1
    ref = ptwt.waverec2([ll, ptwt.constants.WaveletDetailTuple2d(h, v, d)], "haar")
    torch.testing.assert_close(haar_idwt(coeffs, 1), ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_dwt(t, 2), (x,))
    c = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_idwt(t, 1), (c,))


def test_gradient_matches_ptwt_autograd():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(2, 12, 4, 4, generator=torch.Generator().manual_seed(5))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (haar_dwt(x1, 2) * weight).sum().backward()
    (ptwt_reference(x2, 2) * weight).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_bf16_under_autocast_gives_fp32():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = haar_dwt(x.bfloat16(), 3)
        inv = haar_idwt(haar_dwt(x.bfloat16(), 1))
    assert out.dtype == torch.float32 and inv.dtype == torch.float32
    # Only the bf16 rounding of the input differs from the fp32 reference.
    torch.testing.assert_close(out, ptwt_reference(x.bfloat16().float(), 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ptwt_reference(x, 3), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(inv, x.bfloat16().float(), atol=1e-6, rtol=1e-6)


def test_channels_last_input():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    out = haar_dwt(x.to(memory_format=torch.channels_last), 2)
    torch.testing.assert_close(out, ptwt_reference(x, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,level", [((1, 3, 12, 16), 3), ((1, 3, 16, 10), 2), ((1, 3, 7, 8), 1)])
def test_bad_size_raises(shape, level):
    with pytest.raises(ValueError, match="divisible"):
        haar_dwt(torch.zeros(shape), level)


def test_bad_rank_and_level_raise():
    with pytest.raises(ValueError, match="NCHW"):
        haar_dwt(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="level"):
        haar_dwt(torch.zeros(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="4C"):
        haar_idwt(torch.zeros(1, 3, 4, 4))

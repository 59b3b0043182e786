"""Non-Haar wavelet front ends: the ptwt path against PyWavelets, the crop to Haar sizes, and the encoder."""
import numpy as np
import pytest
import pywt
import torch

from autoencoder.litevae_encoder import LiteVAEEncoder
from autoencoder.wavelets import WAVELET_MODES, discrete_wavelet, dwt_pyramid, haar_dwt_pyramid, wavelet_dwt_pyramid
from ldm.util import count_params

TINY = dict(size=None, extractor_channels=8, extractor_mult=(1, 2), aggregator_channels=8,
            aggregator_mult=(1, 2), norm_groups=4)


def pywt_reference(x: torch.Tensor, wavelet: str, level: int, mode: str) -> np.ndarray:
    """Band-major [LL, H, V, D] of the coarsest level of ``pywt.wavedec2``, / 2**level (our convention)."""
    coeffs = pywt.wavedec2(x.double().numpy(), wavelet, mode=mode, level=level)
    return np.concatenate([coeffs[0], *coeffs[1]], axis=1) / 2**level


@pytest.mark.parametrize("mode", WAVELET_MODES)
@pytest.mark.parametrize("wavelet", ["db2", "sym4"])
def test_matches_pywt_each_level(wavelet, mode):
    # 64x72 keeps 3 levels within pywt.dwt_max_level for sym4 (no "level too high" warning).
    x = torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(0))
    pyramid = wavelet_dwt_pyramid(x, wavelet, 3, mode)
    for level, out in enumerate(pyramid, start=1):
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), pywt_reference(x, wavelet, level, mode), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wavelet", [w for w in pywt.wavelist(kind="discrete") if pywt.Wavelet(w).dec_len <= 20])
def test_periodization_matches_pywt_for_every_short_wavelet(wavelet):
    """Both sampling phases of the roll-and-crop construction (dec_len / 2 odd and even)."""
    x = torch.randn(1, 2, 48, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = wavelet_dwt_pyramid(x, wavelet, 1, "periodization")[0]
    np.testing.assert_allclose(out.numpy(), pywt_reference(x, wavelet, 1, "periodization"), atol=1e-10)


@pytest.mark.parametrize("mode", WAVELET_MODES)
def test_generic_haar_equals_fast_path(mode):
    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(2))
    fast = haar_dwt_pyramid(x, 3)
    for generic, reference in zip(wavelet_dwt_pyramid(x, "haar", 3, mode), fast):
        torch.testing.assert_close(generic, reference, atol=1e-6, rtol=1e-6)
    for dispatched, reference in zip(dwt_pyramid(x, "haar", 3, mode), fast):
        torch.testing.assert_close(dispatched, reference, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["symmetric", "zero", "periodization"])
@pytest.mark.parametrize("wavelet", ["db2", "sym4", "bior2.2"])
def test_cropped_to_haar_sizes(wavelet, mode):
    """dwt_pyramid is the centre window (H/2^l x W/2^l) of the PyWavelets-sized bands."""
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    full = wavelet_dwt_pyramid(x, wavelet, 3, mode)
    for level, (cropped, uncropped) in enumerate(zip(dwt_pyramid(x, wavelet, 3, mode), full), start=1):
        h, w = 32 // 2**level, 48 // 2**level
        assert cropped.shape == (2, 12, h, w)
        top, left = (uncropped.shape[-2] - h) // 2, (uncropped.shape[-1] - w) // 2
        torch.testing.assert_close(cropped, uncropped[..., top: top + h, left: left + w], atol=0, rtol=0)


def test_surplus_grows_with_filter_length():
    """floor((N + L - 1) / 2) per level on the full LL: the sizes the module docstring states."""
    x = torch.zeros(1, 1, 64, 64)
    sizes = {w: [o.shape[-1] for o in wavelet_dwt_pyramid(x, w, 3, "symmetric")] for w in ("db2", "sym4")}
    assert sizes == {"db2": [33, 18, 10], "sym4": [35, 21, 14]}


@pytest.mark.parametrize("mode", ["symmetric", "periodization"])
@pytest.mark.parametrize("wavelet", ["db2", "sym4", "bior2.2"])
def test_constant_image_keeps_its_value_in_ll(wavelet, mode):
    """The /2**l convention: unit DC gain of LL at every level, as for Haar; details vanish."""
    x = torch.full((1, 3, 32, 32), 0.7)
    for bands in dwt_pyramid(x, wavelet, 3, mode):
        torch.testing.assert_close(bands[:, :3], torch.full_like(bands[:, :3], 0.7), atol=1e-5, rtol=0)
        torch.testing.assert_close(bands[:, 3:], torch.zeros_like(bands[:, 3:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["symmetric", "periodization"])
def test_gradcheck_float64(mode):
    x = torch.randn(1, 1, 16, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tuple(dwt_pyramid(t, "db2", 2, mode)), (x,))


def test_bad_names_and_modes_raise():
    for name in ("db99", "morl", "nope"):  # unknown, continuous, nonsense
        with pytest.raises(ValueError, match=r"wavelist\(kind='discrete'\)"):
            discrete_wavelet(name)
    with pytest.raises(ValueError, match="periodization"):
        discrete_wavelet("db2", "smooth")
    with pytest.raises(ValueError, match="wavelist"), torch.device("meta"):
        LiteVAEEncoder(size="S", wavelet="db99")
    with pytest.raises(ValueError, match="wavelet mode"), torch.device("meta"):
        LiteVAEEncoder(size="S", wavelet="haar", wavelet_mode="antireflect")


@pytest.mark.parametrize("size,expected", [("S", 1_035_692), ("B", 6_750_636)])
def test_encoder_parameters_same_as_haar(size, expected):
    with torch.device("meta"):
        haar, db2 = LiteVAEEncoder(size=size), LiteVAEEncoder(size=size, wavelet="db2")
    assert count_params(db2) == count_params(haar) == expected
    # Same keys and shapes: a Haar checkpoint loads into a db2 encoder and vice versa.
    assert {k: v.shape for k, v in db2.state_dict().items()} == {k: v.shape for k, v in haar.state_dict().items()}


@pytest.mark.parametrize("hw", [64, 256])
def test_encoder_latent_shape_same_as_haar(hw):
    torch.manual_seed(0)
    haar = LiteVAEEncoder(**TINY).eval()
    x = torch.rand(2, 3, hw, hw) * 2 - 1
    with torch.inference_mode():
        expected = haar(x)
        for wavelet, mode in [("db2", "symmetric"), ("sym4", "periodization")]:
            model = LiteVAEEncoder(wavelet=wavelet, wavelet_mode=mode, **TINY).eval()
            model.load_state_dict(haar.state_dict())
            out = model(x)
            assert out.shape == expected.shape == (2, 8, hw // 8, hw // 8)
            assert torch.isfinite(out).all() and not torch.equal(out, expected)


def test_encoder_matches_pywt_composition():
    """pywt bands / 2**l, centre-cropped to H/2^l -> F_l -> avg-pool to H/8 -> concat -> F_agg."""
    torch.manual_seed(1)
    model = LiteVAEEncoder(wavelet="db2", **TINY).eval()
    x = torch.rand(2, 3, 32, 40) * 2 - 1
    features = []
    for level, extractor in enumerate(model.extractors, start=1):
        full = torch.from_numpy(pywt_reference(x, "db2", level, "symmetric")).float()
        h, w = 32 // 2**level, 40 // 2**level
        top, left = (full.shape[-2] - h) // 2, (full.shape[-1] - w) // 2
        out = extractor(full[..., top: top + h, left: left + w])
        features.append(torch.nn.functional.avg_pool2d(out, 2 ** (3 - level)))
    reference = model.aggregator(torch.cat(features, dim=1))
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


def test_encoder_is_differentiable():
    torch.manual_seed(2)
    model = LiteVAEEncoder(wavelet="db2", **TINY)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(f.in_layer.weight.grad.abs().sum() > 0 for f in model.extractors)

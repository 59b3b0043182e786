"""Discriminators: output shapes, spectral normalisation (σ_max ≈ 1), finite gradients."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from autoencoder.discriminator import PatchGANDiscriminator, UNetDiscriminator


def _small_unet(**kw) -> UNetDiscriminator:
    return UNetDiscriminator(channels=8, ch_mult=(1, 2, 4, 8), **kw)


def _sn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("size", [32, 64])
def test_unet_shapes(size):
    torch.manual_seed(0)
    global_logits, pixel_logits = _small_unet()(torch.randn(2, 3, size, size))
    assert global_logits.shape == (2, 1)
    assert pixel_logits.shape == (2, 1, size, size)


@pytest.mark.parametrize("size", [32, 64])
def test_patchgan_shapes(size):
    torch.manual_seed(0)
    global_logits, patch_logits = PatchGANDiscriminator(channels=8, n_layers=3)(torch.randn(2, 3, size, size))
    # pix2pix NLayer: three stride-2 4×4 convs (pad 1) halve the size, two stride-1 4×4 convs remove 1 each
    assert global_logits is None
    assert patch_logits.shape == (2, 1, size // 8 - 2, size // 8 - 2)


def test_unet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible by 16"):
        _small_unet()(torch.randn(1, 3, 24, 24))


@pytest.mark.parametrize("make", [_small_unet, lambda **kw: PatchGANDiscriminator(channels=8, **kw)])
def test_spectral_norm_present_or_absent(make):
    assert all(parametrize.is_parametrized(m, "weight") for m in _sn_layers(make()))
    assert not any(parametrize.is_parametrized(m, "weight") for m in _sn_layers(make(spectral_norm=False)))


def test_spectral_norm_unit_largest_singular_value():
    torch.manual_seed(0)
    disc = _small_unet().train()
    x = torch.randn(1, 3, 32, 32)
    for _ in range(30):  # each training-mode forward runs one power iteration per layer
        disc(x)
    for layer in (disc.down[1].conv1, disc.up[0].conv2, disc.pixel_head, disc.global_head):
        w = layer.weight  # effective (normalised) weight
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=2e-2)
        raw = layer.parametrizations.weight.original
        assert torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2).item() != pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("make", [_small_unet, lambda: PatchGANDiscriminator(channels=8, norm="group")])
def test_gradients_finite(make):
    torch.manual_seed(0)
    disc = make()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    global_logits, map_logits = disc(x)
    loss = map_logits.mean() + (global_logits.mean() if global_logits is not None else 0.0)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

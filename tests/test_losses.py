"""AutoencoderLoss against independent computations (ptwt, torchvision, torch.distributions, hand formulas)."""
import logging
import math

import ptwt
import pytest
import pywt
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from autoencoder.losses import (AutoencoderLoss, discriminator_adv_loss, gaussian_highfreq_loss,
                                generator_adv_loss, wavelet_highfreq_loss)
from ldm.first_stage.posterior import DiagonalGaussian

SMALL_D = {"target": "autoencoder.discriminator.UNetDiscriminator", "params": {"channels": 8, "ch_mult": [1, 2]}}
LOG_KEYS = {"loss", "rec", "lpips", "kl", "wavelet", "gauss", "g_adv", "disc_factor", "d_weight"}


def make_loss(**kw) -> AutoencoderLoss:
    kw.setdefault("perceptual_weight", 0.0)
    return AutoencoderLoss(discriminator=SMALL_D, **{"disc_start": 10, **kw})


def batch(size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    xrec = (x + 0.3 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    posterior = DiagonalGaussian(torch.randn(2, 8, size // 8, size // 8, generator=g))
    return x, xrec, posterior


class CountingDiscriminator(nn.Module):
    """Deterministic stand-in: global logit = per-sample mean, map logit = first channel; counts calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.scale * x.mean(dim=(1, 2, 3))[:, None], self.scale * x[:, :1]


# ------------------------------------------------------------------------- elementary terms
def test_wavelet_loss_matches_ptwt_and_has_gradient():
    x, xrec, _ = batch()
    eps = 1e-3

    def reference(img):
        _, (h, v, d) = ptwt.wavedec2(img.double(), pywt.Wavelet("haar"), level=1, mode="symmetric")
        return torch.cat([h, v, d], dim=1) / 2

    ref = torch.sqrt((reference(x) - reference(xrec)).pow(2) + eps**2).mean()
    ours = wavelet_highfreq_loss(x, xrec, eps)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, xrec)
    (grad_ref,) = torch.autograd.grad(ref, xrec)
    assert grad_ours.abs().sum() > 0
    torch.testing.assert_close(grad_ours, grad_ref.float(), rtol=1e-4, atol=1e-9)
    # LL is excluded: a constant shift (pure LL change) leaves the loss unchanged
    assert wavelet_highfreq_loss(x, x + 0.5, eps).item() == pytest.approx(eps, rel=1e-4)


def test_gaussian_highfreq_loss_matches_torchvision():
    x, xrec, _ = batch()
    k, sigma = 5, 1.0

    def highpass(img):
        return img - tv_gaussian_blur(img, [k, k], [sigma, sigma])  # torchvision pads with reflect

    ref = (highpass(xrec) - highpass(x)).abs().mean()
    assert gaussian_highfreq_loss(x, xrec, k, sigma).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_term_matches_closed_form_and_total_is_weighted_sum():
    x, xrec, posterior = batch()
    loss_fn = make_loss(kl_weight=1e-3, wavelet_weight=0.5, gaussian_weight=0.25, pixel_weight=2.0)
    loss, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=0)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.std))
    kl_ref = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()
    assert logs["kl"].item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert logs["rec"].item() == pytest.approx(F.l1_loss(xrec, x).item(), rel=1e-6)
    expected = 2.0 * logs["rec"] + 0.5 * logs["wavelet"] + 0.25 * logs["gauss"] + 1e-3 * kl_ref
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_charbonnier_pixel_loss():
    x, xrec, posterior = batch()
    _, logs = make_loss(pixel_loss="charbonnier", charbonnier_eps=0.01).generator_loss(x, xrec, posterior, 0)
    assert logs["rec"].item() == pytest.approx(torch.sqrt((x - xrec) ** 2 + 1e-4).mean().item(), rel=1e-5)


def test_gan_losses_hand_formulas():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge: mean relu(1 - r) = (0 + 0.5 + 2)/3, mean relu(1 + f) = (0 + 1 + 2)/3
    assert discriminator_adv_loss("hinge", real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert generator_adv_loss("hinge", fake).item() == pytest.approx(1.0 / 3)
    sp = lambda t: math.log1p(math.exp(t))  # softplus
    d_ns = sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 3
    assert discriminator_adv_loss("non_saturating", real, fake).item() == pytest.approx(d_ns, rel=1e-6)
    g_ns = sum(-math.log(1 / (1 + math.exp(-f))) for f in fake.tolist()) / 3  # -log sigmoid(D(x̂))
    assert generator_adv_loss("non_saturating", fake).item() == pytest.approx(g_ns, rel=1e-6)


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_module_combines_global_and_pixel_logits(kind):
    x, xrec, posterior = batch()
    loss_fn = make_loss(disc_loss=kind, disc_pixel_weight=0.5, disc_weight=0.3)
    loss_fn.discriminator = CountingDiscriminator()
    d_real, d_fake = loss_fn.discriminator(x), loss_fn.discriminator(xrec.detach())
    if kind == "hinge":
        d_ref = sum(w * (F.relu(1 - r).mean() + F.relu(1 + f).mean())
                    for w, r, f in [(1.0, d_real[0], d_fake[0]), (0.5, d_real[1], d_fake[1])])
        g_ref = -d_fake[0].mean() - 0.5 * d_fake[1].mean()
    else:
        d_ref = sum(w * (F.softplus(-r).mean() + F.softplus(f).mean())
                    for w, r, f in [(1.0, d_real[0], d_fake[0]), (0.5, d_real[1], d_fake[1])])
        g_ref = -F.logsigmoid(d_fake[0]).mean() - 0.5 * F.logsigmoid(d_fake[1]).mean()
    d_loss, d_logs = loss_fn.discriminator_loss(x, xrec, global_step=10)
    assert d_loss.item() == pytest.approx(d_ref.item(), rel=1e-5)
    assert d_logs["logits_real"].item() == pytest.approx(d_real[0].mean().item(), rel=1e-5)
    assert d_logs["logits_fake"].item() == pytest.approx(d_fake[0].mean().item(), rel=1e-5)
    loss, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=10)
    assert logs["g_adv"].item() == pytest.approx(g_ref.item(), rel=1e-5)
    assert logs["d_weight"].item() == pytest.approx(0.3)
    _, logs_inactive = make_loss().generator_loss(x, xrec, posterior, global_step=0)
    assert loss.item() == pytest.approx(logs_inactive["loss"].item() + 0.3 * g_ref.item(), rel=1e-5)


# ------------------------------------------------------------------------- schedule
def test_no_discriminator_before_start_then_active():
    x, xrec, posterior = batch()
    loss_fn = make_loss(disc_start=10)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *_: calls.append(1))
    assert not loss_fn.disc_active(9) and loss_fn.disc_active(10)
    loss, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=9)
    assert set(logs) == LOG_KEYS and logs["g_adv"] == 0 and logs["disc_factor"] == 0 and logs["d_weight"] == 0
    with pytest.raises(RuntimeError, match="disc_start"):
        loss_fn.discriminator_loss(x, xrec, global_step=9)
    assert calls == []

    loss, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=10)
    assert set(logs) == LOG_KEYS and logs["disc_factor"] == 1 and logs["g_adv"] != 0
    d_loss, d_logs = loss_fn.discriminator_loss(x, xrec, global_step=10)
    assert set(d_logs) == {"d_loss", "logits_real", "logits_fake"}
    assert torch.isfinite(loss) and torch.isfinite(d_loss) and len(calls) == 2
    loss.backward()
    assert torch.isfinite(xrec.grad).all()


def test_losses_are_fp32_under_autocast():
    x, xrec, posterior = batch()
    loss_fn = make_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = loss_fn.generator_loss(x.bfloat16(), xrec.bfloat16(), posterior, global_step=10)
        d_loss, _ = loss_fn.discriminator_loss(x.bfloat16(), xrec.bfloat16(), global_step=10)
    assert loss.dtype == d_loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())


def test_adaptive_weight_matches_manual_autograd():
    torch.manual_seed(0)
    x, _, posterior = batch()
    decoder = nn.Conv2d(3, 3, 3, padding=1)  # stands in for the decoder; its weight is "last_layer"
    xrec = decoder(x + 0.1)
    loss_fn = make_loss(adaptive_disc_weight=True, disc_weight=0.7)
    loss_fn.discriminator.eval()  # no power-iteration update, so repeated D forwards agree
    loss, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=10, last_layer=decoder.weight)

    nll = F.l1_loss(xrec, x) + wavelet_highfreq_loss(x, xrec, 1e-3) + gaussian_highfreq_loss(x, xrec, 5, 1.0)
    global_logits, pixel_logits = loss_fn.discriminator(xrec)
    g_adv = -global_logits.mean() - pixel_logits.mean()
    (g_nll,) = torch.autograd.grad(nll, decoder.weight, retain_graph=True)
    (g_g,) = torch.autograd.grad(g_adv, decoder.weight, retain_graph=True)
    expected = 0.7 * (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4)
    assert logs["d_weight"].item() == pytest.approx(expected.item(), rel=1e-4)
    # the weight is detached: the total gradient is ∇nll + w·∇g_adv (KL does not touch the decoder)
    (g_total,) = torch.autograd.grad(loss, decoder.weight)
    torch.testing.assert_close(g_total, g_nll + expected * g_g, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, xrec, posterior, global_step=10)
    # Validation runs without gradients and without last_layer: the constant weight applies, no error.
    with torch.no_grad():
        _, val_logs = loss_fn.generator_loss(x, decoder(x + 0.1), posterior, global_step=10)
    assert val_logs["d_weight"].item() == pytest.approx(0.7)


# ------------------------------------------------------------------------- LPIPS
def _no_vgg_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("LITEVAE_VGG16", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))


def test_lpips_skip_gives_zero_perceptual_with_warning(monkeypatch, tmp_path, caplog):
    _no_vgg_weights(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger="autoencoder.losses"):
        loss_fn = make_loss(perceptual_weight=1.0, lpips={"if_missing": "skip"})
    assert loss_fn.lpips is None
    assert any("perceptual" in r.message and r.name == "autoencoder.losses" for r in caplog.records)
    x, xrec, posterior = batch()
    _, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=0)
    assert logs["lpips"].item() == 0.0
    with pytest.raises(FileNotFoundError, match="vgg16"):
        make_loss(perceptual_weight=1.0)  # default if_missing="error"


def test_lpips_random_is_positive_differentiable_and_not_saved(monkeypatch, tmp_path):
    _no_vgg_weights(monkeypatch, tmp_path)
    torch.manual_seed(0)
    loss_fn = make_loss(perceptual_weight=1.0, lpips={"if_missing": "random"})
    x, xrec, posterior = batch(size=32)
    _, logs = loss_fn.generator_loss(x, xrec, posterior, global_step=0)
    assert logs["lpips"].item() > 0
    (grad,) = torch.autograd.grad(loss_fn.lpips(xrec, x).sum(), xrec)
    assert grad.abs().sum() > 0
    # frozen LPIPS stays out of parameters, state_dict and hence optimizers/checkpoints
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in loss_fn.discriminator.parameters()}
    assert all(k.startswith("discriminator.") for k in loss_fn.state_dict())
    assert not any(p.requires_grad for p in loss_fn.lpips.parameters())

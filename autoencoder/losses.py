"""LiteVAE stage-1 objective (paper Eq. 1, §4.3): pixel + LPIPS + KL + wavelet-HF + Gaussian-HF + adversarial.

The paper publishes none of the loss weights; every weight is a constructor argument whose default
is justified in docs/stage1.md, "Stage-1 loss weights and hyperparameters". All losses are computed in fp32
with autocast disabled (GAN/VAE losses in bf16/fp16 are a known NaN source).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.first_stage.posterior import DiagonalGaussian
from autoencoder.wavelets import haar_dwt
from ldm.rescale import downscale, scaled_sizes
from ldm.util import check_range, instantiate_from_config

log = logging.getLogger(__name__)

DEFAULT_DISCRIMINATOR = {"target": "autoencoder.discriminator.UNetDiscriminator", "params": {}}
DEFAULT_LPIPS = {"vgg_weights": None, "if_missing": "error"}
ADAPTIVE_DELTA = 1e-4  # δ in Eq. (2) (VQGAN)
ADAPTIVE_MAX = 1e4


# ---------------------------------------------------------------------------------------------
# Elementary losses (pure functions; the tests compare them with independent computations)
# ---------------------------------------------------------------------------------------------
def charbonnier(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Mean Charbonnier penalty ``sqrt((a - b)² + ε²)`` (Barron's general loss at α = 1, up to scale)."""
    return torch.sqrt((a - b).pow(2) + eps * eps).mean()


def wavelet_highfreq_loss(x: Tensor, xrec: Tensor, eps: float) -> Tensor:
    """Charbonnier between the level-1 Haar detail bands (H, V, D; LL excluded) of ``x`` and ``xrec``.

    ``haar_dwt`` is differentiable (the paper's pseudocode computes the DWT without gradients, which would kill
    this loss).
    """
    channels = x.shape[1]
    return charbonnier(haar_dwt(x, 1)[:, channels:], haar_dwt(xrec, 1)[:, channels:], eps)


def gaussian_kernel1d(kernel_size: int, sigma: float, device=None) -> Tensor:
    """Normalised sampled Gaussian (same sampling as ``torchvision.transforms.functional.gaussian_blur``)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma).pow(2))
    return k / k.sum()


def gaussian_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Depthwise Gaussian blur with reflect padding, done as two separable 1-D convolutions."""
    channels, pad = x.shape[1], kernel_size // 2
    k = gaussian_kernel1d(kernel_size, sigma, x.device).to(x.dtype)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)


def gaussian_highfreq_loss(x: Tensor, xrec: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """L1 between the high-pass residuals ``x − h(x)`` and ``x̂ − h(x̂)``, h = Gaussian blur."""
    return F.l1_loss(xrec - gaussian_blur(xrec, kernel_size, sigma), x - gaussian_blur(x, kernel_size, sigma))


def generator_adv_loss(kind: str, logits_fake: Tensor) -> Tensor:
    """Generator side: hinge ``−D(x̂)``; non-saturating ``softplus(−D(x̂)) = −log σ(D(x̂))`` (mean)."""
    return (-logits_fake if kind == "hinge" else F.softplus(-logits_fake)).mean()


def discriminator_adv_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge ``relu(1 − D(x)) + relu(1 + D(x̂))``; non-saturating ``softplus(−D(x)) + softplus(D(x̂))``.

    Each side is a mean; no ½ factor (it would only rescale the discriminator learning rate).
    """
    if kind == "hinge":
        return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def _fp32_region(x: Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
class AutoencoderLoss(nn.Module):
    """The LiteVAE training objective with its discriminator (used by the stage-1 LightningModule).

    **The paper publishes no loss weights** (Eq. 1, §4.3). Every default, its source and the reason for it are in
    one place: docs/stage1.md, "Stage-1 loss weights and hyperparameters".

    Reductions: pixel, LPIPS, wavelet and Gaussian terms are per-element (per-image for LPIPS) *means*, so
    weights do not depend on resolution and a constant GAN weight is meaningful. KL is summed over C, H, W and
    averaged over the batch (paper / LDM); LDM *sums* its reconstruction over pixels, so its ``kl_weight=1e-6``
    is 3·H·W times weaker relative to reconstruction than the same number here.

    LPIPS is frozen and deliberately kept out of ``parameters()``/``state_dict()``: it would add ~58 MB
    to every checkpoint, break strict loading of checkpoints made without it, and it must never reach
    an optimizer or DDP's gradient buckets. It is stored outside the module tree and moved lazily to
    the input's device. The discriminator is an ordinary submodule (``self.discriminator``), so its
    weights and spectral-norm vectors are saved for resume; give its parameters to the D optimizer.
    """

    def __init__(self, pixel_loss: Literal["l1", "charbonnier"] = "l1", pixel_weight: float = 1.0,
                 charbonnier_eps: float = 1e-3, kl_weight: float = 1e-6, perceptual_weight: float = 1.0,
                 lpips: Mapping[str, Any] | None = None, wavelet_weight: float = 1.0,
                 gaussian_weight: float = 1.0, gaussian_sigma: float = 1.0, gaussian_kernel_size: int = 5,
                 disc_weight: float = 0.1, disc_start: int = 40_000,
                 disc_loss: Literal["hinge", "non_saturating"] = "hinge", adaptive_disc_weight: bool = False,
                 discriminator: Mapping[str, Any] | None = None, disc_pixel_weight: float = 1.0,
                 disc_fp32: bool = True, equivariance_weight: float = 0.0,
                 equivariance_factors: Sequence[float] = (2.0, 4.0 / 3.0)):
        super().__init__()
        for name, value in (("pixel_weight", pixel_weight), ("kl_weight", kl_weight),
                            ("perceptual_weight", perceptual_weight), ("wavelet_weight", wavelet_weight),
                            ("gaussian_weight", gaussian_weight), ("disc_weight", disc_weight),
                            ("disc_start", disc_start), ("disc_pixel_weight", disc_pixel_weight),
                            ("equivariance_weight", equivariance_weight)):
            check_range(name, value, 0)
        for factor in equivariance_factors:
            check_range("equivariance_factors[]", factor, 1, above=True)
        check_range("charbonnier_eps", charbonnier_eps, 0, above=True)
        check_range("gaussian_sigma", gaussian_sigma, 0, above=True)
        if pixel_loss not in ("l1", "charbonnier"):
            raise ValueError(f"pixel_loss must be 'l1' or 'charbonnier', got {pixel_loss!r}")
        if disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {disc_loss!r}")
        if gaussian_kernel_size % 2 == 0 or gaussian_kernel_size < 3:
            raise ValueError(f"gaussian_kernel_size must be odd and >= 3, got {gaussian_kernel_size}")
        self.pixel_loss, self.pixel_weight, self.charbonnier_eps = pixel_loss, pixel_weight, charbonnier_eps
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.wavelet_weight, self.gaussian_weight = wavelet_weight, gaussian_weight
        self.gaussian_sigma, self.gaussian_kernel_size = gaussian_sigma, gaussian_kernel_size
        self.disc_weight, self.disc_start, self.disc_loss = disc_weight, disc_start, disc_loss
        self.adaptive_disc_weight, self.disc_pixel_weight, self.disc_fp32 = adaptive_disc_weight, disc_pixel_weight, disc_fp32
        # Scale equivariance (EQ-VAE): decoding the down-scaled latent should give the down-scaled image. Off (0) by
        # default; one factor is drawn per step from ``equivariance_factors``.
        self.equivariance_weight, self.equivariance_factors = float(equivariance_weight), tuple(equivariance_factors)
        self.discriminator = instantiate_from_config(discriminator or DEFAULT_DISCRIMINATOR, where="loss.discriminator")
        # object.__setattr__ bypasses nn.Module registration: see the class docstring.
        object.__setattr__(self, "_lpips", self._build_lpips(lpips))

    def _build_lpips(self, cfg: Mapping[str, Any] | None) -> nn.Module | None:
        if self.perceptual_weight == 0:
            return None
        from ldm.metrics.lpips import build_lpips  # heavy import (lpips package), only when needed

        model = build_lpips(**{**DEFAULT_LPIPS, **dict(cfg or {})})
        if model is None:
            log.warning("perceptual (LPIPS) loss disabled: no VGG16 weights found and lpips.if_missing='skip'; "
                        "the 'lpips' term will be logged as 0")
        return model

    @property
    def lpips(self) -> nn.Module | None:
        return self._lpips

    # ------------------------------------------------------------------ schedule
    def disc_active(self, global_step: int) -> bool:
        return global_step >= self.disc_start

    # ------------------------------------------------------------------ pieces
    def _pixel(self, x: Tensor, xrec: Tensor) -> Tensor:
        if self.pixel_loss == "l1":
            return F.l1_loss(xrec, x)
        return charbonnier(xrec, x, self.charbonnier_eps)

    def _perceptual(self, x: Tensor, xrec: Tensor) -> Tensor:
        if self._lpips is None:
            return x.new_zeros(())
        if next(self._lpips.parameters()).device != x.device:
            self._lpips.to(x.device)
        return self._lpips(xrec, x).mean()

    def _run_discriminator(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        ctx = torch.autocast(device_type=x.device.type, enabled=False) if self.disc_fp32 else contextlib.nullcontext()
        with ctx:
            global_logits, map_logits = self.discriminator(x.float() if self.disc_fp32 else x)
        return (None if global_logits is None else global_logits.float()), map_logits.float()

    def _map_weight(self, global_logits: Tensor | None) -> float:
        # PatchGAN has no global logit: its map is then the whole loss, weighted 1.
        return self.disc_pixel_weight if global_logits is not None else 1.0

    def _g_adv(self, logits: tuple[Tensor | None, Tensor]) -> Tensor:
        global_logits, map_logits = logits
        loss = self._map_weight(global_logits) * generator_adv_loss(self.disc_loss, map_logits)
        if global_logits is not None:
            loss = loss + generator_adv_loss(self.disc_loss, global_logits)
        return loss

    def _adaptive_weight(self, nll: Tensor, g_adv: Tensor, last_layer: Tensor | None) -> Tensor:
        """VQGAN Eq. (2): ‖∇nll‖ / (‖∇g_adv‖ + δ) at ``last_layer``, clamped to [0, 1e4], detached."""
        if not (torch.is_grad_enabled() and nll.requires_grad and g_adv.requires_grad):
            return nll.new_ones(())  # validation / no-grad: no gradients to compare, use the constant weight
        if last_layer is None:
            raise ValueError("adaptive_disc_weight=True needs last_layer (e.g. the decoder's conv_out.weight)")
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0]
        ratio = nll_grad.norm() / (g_grad.norm() + ADAPTIVE_DELTA)
        return ratio.clamp(0.0, ADAPTIVE_MAX).detach()

    def equivariance(self, x: Tensor, z: Tensor, decode: Callable[[Tensor], Tensor],
                     generator: torch.Generator | None) -> Tensor:
        """L1 between D(down_s(z)) and down_s(x) for one factor s drawn from ``equivariance_factors`` with
        ``generator``. EQ-VAE applies its whole reconstruction loss; L1 keeps this regulariser cheap."""
        factor = self.equivariance_factors[int(torch.randint(len(self.equivariance_factors), (), generator=generator))]
        latent_size, image_size = scaled_sizes(z.shape[-2:], x.shape[-2:], factor)
        decoded = decode(downscale(z, latent_size).to(z.dtype))
        return (decoded.float() - downscale(x, image_size)).abs().mean()

    # ------------------------------------------------------------------ public API
    def generator_loss(self, x: Tensor, xrec: Tensor, posterior: DiagonalGaussian, global_step: int,
                       last_layer: Tensor | None = None, decode: Callable[[Tensor], Tensor] | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss and detached logs (every key present every step, zeros when inactive).

        ``decode`` (the autoencoder's decoder) and ``generator`` (the step's scale draw) switch the equivariance term
        on when ``equivariance_weight > 0``; without them (validation) it is left out."""
        with _fp32_region(x):
            x, xrec = x.float(), xrec.float()
            rec = self._pixel(x, xrec)
            perceptual = self._perceptual(x, xrec)
            kl = posterior.kl().float().mean()
            wavelet = wavelet_highfreq_loss(x, xrec, self.charbonnier_eps)
            gauss = gaussian_highfreq_loss(x, xrec, self.gaussian_kernel_size, self.gaussian_sigma)
            nll = (self.pixel_weight * rec + self.perceptual_weight * perceptual
                   + self.wavelet_weight * wavelet + self.gaussian_weight * gauss)
            loss = nll + self.kl_weight * kl
            zero = x.new_zeros(())
            g_adv, d_weight, disc_factor = zero, zero, zero
            if self.disc_active(global_step):  # before disc_start: no discriminator forward at all
                g_adv = self._g_adv(self._run_discriminator(xrec))
                d_weight = x.new_tensor(self.disc_weight)
                if self.adaptive_disc_weight:
                    d_weight = d_weight * self._adaptive_weight(nll, g_adv, last_layer)
                disc_factor = x.new_ones(())
                loss = loss + d_weight * g_adv
        logs = {"loss": loss, "rec": rec, "lpips": perceptual, "kl": kl, "wavelet": wavelet, "gauss": gauss,
                "g_adv": g_adv, "disc_factor": disc_factor, "d_weight": d_weight}
        if self.equivariance_weight > 0 and decode is not None:
            logs["eq"] = self.equivariance(x, posterior.mode(), decode, generator)
            loss = logs["loss"] = loss + self.equivariance_weight * logs["eq"]
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, x: Tensor, xrec: Tensor, global_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real ``x`` and detached ``xrec`` (one forward on the concatenated batch)."""
        if not self.disc_active(global_step):
            raise RuntimeError(f"discriminator_loss called at step {global_step} < disc_start={self.disc_start}; "
                               "check disc_active(step) first (the discriminator is not trained before then)")
        with _fp32_region(x):
            both = torch.cat([x.float(), xrec.detach().float()], dim=0)
            global_logits, map_logits = self._run_discriminator(both)
            map_real, map_fake = map_logits.chunk(2, dim=0)
            loss = self._map_weight(global_logits) * discriminator_adv_loss(self.disc_loss, map_real, map_fake)
            summary_real, summary_fake = map_real, map_fake
            if global_logits is not None:
                real, fake = global_logits.chunk(2, dim=0)
                loss = loss + discriminator_adv_loss(self.disc_loss, real, fake)
                summary_real, summary_fake = real, fake
        logs = {"d_loss": loss, "logits_real": summary_real.mean(), "logits_fake": summary_fake.mean()}
        return loss, {k: v.detach() for k, v in logs.items()}

"""Discriminators for stage-1 adversarial training.

Both return ``(global_logits, map_logits)`` so the loss treats them alike:

* :class:`UNetDiscriminator` — the U-Net GAN discriminator of Schönfeld et al. (CVPR 2020), which
  LiteVAE uses (LiteVAE paper, Table 10): a BigGAN-style residual encoder gives one logit per image, a
  residual decoder with skip connections gives one logit per pixel. Simplified: no self-attention,
  no class projection, no CutMix consistency regularisation.
* :class:`PatchGANDiscriminator` — the pix2pix / LDM "NLayer" PatchGAN (``global_logits`` is None).

Spectral normalisation uses ``torch.nn.utils.parametrizations.spectral_norm``; its power-iteration
vectors are buffers, so they are saved in checkpoints and broadcast by DDP. Neither network uses
BatchNorm: batch statistics would differ per DDP rank and between the real and fake halves of a
batch; spectral norm (or GroupNorm) stabilises training without them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

LEAK = 0.2  # LeakyReLU slope: keeps gradients for negative pre-activations (common GAN choice)


def _maybe_sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return _spectral_norm(layer) if enabled else layer


def _act(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAK)


class DownBlock(nn.Module):
    """BigGAN D-block: [act] → conv3×3 → act → conv3×3 → avgpool, plus a 1×1-conv/avgpool shortcut."""

    def __init__(self, in_channels: int, out_channels: int, sn: bool, preactivation: bool = True):
        super().__init__()
        self.preactivation = preactivation  # False for the first block: the raw image is not activated
        self.conv1 = _maybe_sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), sn)
        self.conv2 = _maybe_sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), sn)
        self.shortcut = _maybe_sn(nn.Conv2d(in_channels, out_channels, 1), sn)

    def forward(self, x: Tensor) -> Tensor:
        h = _act(x) if self.preactivation else x
        h = self.conv2(_act(self.conv1(h)))
        return F.avg_pool2d(h, 2) + F.avg_pool2d(self.shortcut(x), 2)


class UpBlock(nn.Module):
    """BigGAN G-block without conditioning: act → 2× nearest up → conv3×3 → act → conv3×3, plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, sn: bool):
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), sn)
        self.conv2 = _maybe_sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), sn)
        self.shortcut = _maybe_sn(nn.Conv2d(in_channels, out_channels, 1), sn)

    def forward(self, x: Tensor) -> Tensor:
        up = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv2(_act(self.conv1(_act(up))))
        return h + self.shortcut(up)


class UNetDiscriminator(nn.Module):
    """U-Net GAN discriminator: ``forward(x) -> (global (B, 1), per-pixel (B, 1, H, W))`` logits.

    Encoder: ``len(ch_mult)`` down blocks of width ``channels·m``. The global logit is a spectral-
    normalised linear layer on the spatially *averaged* bottleneck (BigGAN sums; the mean keeps the
    logit scale independent of resolution, which matters for 128 → 256 fine-tuning). Decoder: up
    blocks mirroring the encoder; each output is concatenated with the encoder feature of the same
    resolution. A 1×1 conv gives the per-pixel logit. H and W must be divisible by ``2**len(ch_mult)``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, ch_mult: tuple[int, ...] = (1, 2, 4, 8),
                 spectral_norm: bool = True):
        super().__init__()
        widths = [channels * m for m in ch_mult]
        self.factor = 2 ** len(widths)
        self.down = nn.ModuleList(
            DownBlock(c_in, c_out, spectral_norm, preactivation=i > 0)
            for i, (c_in, c_out) in enumerate(zip([in_channels] + widths[:-1], widths)))
        self.global_head = _maybe_sn(nn.Linear(widths[-1], 1), spectral_norm)
        # Up block k restores the resolution of encoder output k-1; except at full resolution the
        # matching encoder feature (same width) is concatenated, doubling the width.
        self.up = nn.ModuleList()
        c_cur = widths[-1]
        for k in reversed(range(len(widths))):
            c_out = widths[k - 1] if k > 0 else widths[0]
            self.up.append(UpBlock(c_cur, c_out, spectral_norm))
            c_cur = 2 * c_out if k > 0 else c_out
        self.pixel_head = _maybe_sn(nn.Conv2d(c_cur, 1, 1), spectral_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"UNetDiscriminator needs H and W divisible by {self.factor}, got {tuple(x.shape[-2:])}")
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
        global_logits = self.global_head(_act(h).mean(dim=(2, 3)))
        skips.pop()  # the bottleneck itself is the decoder input, not a skip
        for block in self.up:
            h = block(h)
            if skips:
                h = torch.cat([h, skips.pop()], dim=1)
        return global_logits, self.pixel_head(_act(h))


class PatchGANDiscriminator(nn.Module):
    """pix2pix "NLayer" PatchGAN: ``forward(x) -> (None, patch logits (B, 1, h, w))``.

    4×4 convs, ``n_layers`` stride-2 stages then two stride-1 ones (70×70 receptive field for
    n_layers=3). pix2pix/LDM use BatchNorm; here ``norm="group"`` (GroupNorm) or ``"none"`` with
    spectral norm (default) — see the module docstring for why.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, spectral_norm: bool = True,
                 norm: str = "none"):
        super().__init__()
        if norm not in ("none", "group"):
            raise ValueError(f"norm must be 'none' or 'group', got {norm!r}")
        layers: list[nn.Module] = [_maybe_sn(nn.Conv2d(in_channels, channels, 4, 2, 1), spectral_norm),
                                   nn.LeakyReLU(LEAK)]
        c_prev = channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers.append(_maybe_sn(nn.Conv2d(c_prev, c_out, 4, stride, 1, bias=norm == "none"), spectral_norm))
            if norm == "group":
                layers.append(nn.GroupNorm(32 if c_out % 32 == 0 else 1, c_out))
            layers.append(nn.LeakyReLU(LEAK))
            c_prev = c_out
        layers.append(_maybe_sn(nn.Conv2d(c_prev, 1, 4, 1, 1), spectral_norm))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[None, Tensor]:
        return None, self.main(x)

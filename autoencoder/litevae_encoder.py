"""LiteVAE encoder (arXiv 2405.14477, Fig. 1, App. G): fixed Haar DWT → three feature UNets → aggregator UNet.

``wavelet`` swaps the Haar front end for any discrete PyWavelets wavelet (``db2``, ``sym4``, ...) with
boundary mode ``wavelet_mode``; ``autoencoder.wavelets.dwt_pyramid`` crops its bands to the Haar sizes
(H/2, H/4, H/8; its docstring says how sizes grow with the filter length), so the band channels, the
networks and the parameter count are those of Haar. ``haar`` (default) keeps the fast path and its numbers.

Differences from the paper's App.-G pseudocode, on purpose: each level uses its own
extractor (the pseudocode calls F_1 for level 2), the levels come from one DWT pass (same numbers as
three separate ``wavedec2`` calls), the encoder's mid blocks are plain GroupNorm ResBlocks (SMC is a
decoder change), and there is no 1×1 ``quant_conv`` (Table 17).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoder.blocks import ResnetBlock
from autoencoder.wavelets import discrete_wavelet, dwt_pyramid
from ldm.modules.checkpointing import maybe_checkpoint

DWT_LEVELS = 3
DOWNSAMPLE_FACTOR = 2**DWT_LEVELS

# Tables 23/24: (extractor C, extractor ch_mult, aggregator C, aggregator ch_mult). num_res_blocks = 2
# reproduces every published parameter count exactly (Tables 2 and 3).
PRESETS: dict[str, tuple[int, tuple[int, ...], int, tuple[int, ...]]] = {
    "S": (16, (1, 2, 2), 16, (1, 2, 2)),
    "B": (32, (1, 2, 3), 32, (1, 2, 3)),
    "M": (64, (1, 2, 4), 32, (1, 2, 3)),
    "L": (64, (1, 2, 4), 64, (1, 2, 4)),
}


class LiteVAEUNet(nn.Module):
    """ADM-style UNet without any spatial resampling, attention or time embedding (App. G ``LiteVAEUNetBlock``).

    Encoder path pushes every block output on a skip stack; the decoder path pops one skip per block.
    The paper also pushes ``in_layer``'s output, which is never popped, so it is not stored here.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int, ch_mult: Sequence[int],
                 num_res_blocks: int = 2, dropout: float = 0.0, norm_groups: int = 32,
                 min_group_channels: int = 1):
        super().__init__()
        block = partial(ResnetBlock, dropout=dropout, norm_groups=norm_groups,
                        min_group_channels=min_group_channels)
        self.in_layer = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths, width = [channels], channels
        for mult in ch_mult:
            for _ in range(num_res_blocks):
                self.down.append(block(width, channels * mult))
                width = channels * mult
                skip_widths.append(width)
        self.mid = nn.ModuleList([block(width, width), block(width, width)])
        self.up = nn.ModuleList()
        for mult in reversed(ch_mult):
            for _ in range(num_res_blocks):
                self.up.append(block(width + skip_widths.pop(), channels * mult))
                width = channels * mult
        self.out_layer = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.in_layer(x)
        skips = []  # in_layer's skip is never popped (see class docstring): not keeping it frees it early
        for block in self.down:
            h = block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h)
        for block in self.up:
            # The block takes the only references to h and the skip, so that inference can free them once
            # they are concatenated (the level-1 extractor's first up block is LiteVAE's inference peak).
            parts, h = [h, skips.pop()], None
            h = block.forward_concat(parts)
        return self.out_layer(h)


def _resolve_widths(size: str | None, **explicit) -> dict:
    """Preset values for ``size``, overridden by any explicitly given (non-None) width."""
    if size is not None and size not in PRESETS:
        raise ValueError(f"unknown LiteVAE size {size!r}; choose one of {sorted(PRESETS)} or None")
    names = ("extractor_channels", "extractor_mult", "aggregator_channels", "aggregator_mult")
    preset = dict(zip(names, PRESETS[size])) if size is not None else {}
    widths = {k: explicit[k] if explicit[k] is not None else preset.get(k) for k in names}
    missing = [k for k, v in widths.items() if v is None]
    if missing:
        raise ValueError(f"size=None needs all widths given explicitly; missing {missing}")
    return widths


class LiteVAEEncoder(nn.Module):
    """x (B, in_channels, H, W) in [-1, 1] → moments (B, 2·z_channels, H/8, W/8) = cat([mean, logvar]).

    ``downsample`` brings the level-1 and level-2 features to H/8: ``"avgpool"`` (parameter-free,
    reproduces the published sizes) or ``"conv"`` (a learned 3×3 conv with stride 4 resp. 2, +2,616
    params for RGB; a stride-4 3×3 kernel skips one row/column in four, kept only as the option the
    paper's "41.425M" in Table 3 hints at).

    ``norm_groups`` / ``min_group_channels``: GroupNorm's group count in every UNet block, and the rule for
    narrow layers: at least this many channels per group (1: off, the paper's configs; see
    ``ldm.modules.norm.group_count``).

    ``wavelet`` / ``wavelet_mode``: the fixed front end (``autoencoder.wavelets.dwt_pyramid``); the mode is
    ignored by Haar, whose coefficients are the same in every mode. No parameters depend on either.
    """

    def __init__(self, z_channels: int = 4, size: str | None = "B", in_channels: int = 3,
                 extractor_channels: int | None = None, extractor_mult: Sequence[int] | None = None,
                 aggregator_channels: int | None = None, aggregator_mult: Sequence[int] | None = None,
                 num_res_blocks: int = 2, dropout: float = 0.0, norm_groups: int = 32, min_group_channels: int = 1,
                 downsample: str = "avgpool", activation_checkpointing: bool = False,
                 wavelet: str = "haar", wavelet_mode: str = "symmetric"):
        super().__init__()
        discrete_wavelet(wavelet, wavelet_mode)  # a bad name fails here, not at the first batch
        self.wavelet, self.wavelet_mode = wavelet, wavelet_mode
        # Recompute each UNet's activations in backward instead of storing them: training memory of the
        # encoder drops to its inputs, for one extra encoder forward per step (no effect in inference).
        self.activation_checkpointing = activation_checkpointing
        widths = _resolve_widths(size, extractor_channels=extractor_channels, extractor_mult=extractor_mult,
                                 aggregator_channels=aggregator_channels, aggregator_mult=aggregator_mult)
        if downsample not in ("avgpool", "conv"):
            raise ValueError(f"downsample must be 'avgpool' or 'conv', got {downsample!r}")
        self.z_channels, self.in_channels, self.downsample = z_channels, in_channels, downsample
        band_channels = 4 * in_channels  # LL, H, V, D per input channel
        unet = dict(num_res_blocks=num_res_blocks, dropout=dropout, norm_groups=norm_groups,
                    min_group_channels=min_group_channels)
        # Three separate networks: sharing saves parameters but no compute (Table 19).
        self.extractors = nn.ModuleList(
            LiteVAEUNet(band_channels, band_channels, widths["extractor_channels"], widths["extractor_mult"], **unet)
            for _ in range(DWT_LEVELS))
        if downsample == "conv":
            # Level l features are at H/2^l; strides 4 and 2 bring levels 1 and 2 to H/8.
            self.resamplers = nn.ModuleList(
                nn.Conv2d(band_channels, band_channels, 3, stride=2 ** (DWT_LEVELS - level), padding=1)
                for level in range(1, DWT_LEVELS))
        self.aggregator = LiteVAEUNet(DWT_LEVELS * band_channels, 2 * z_channels, widths["aggregator_channels"],
                                      widths["aggregator_mult"], **unet)

    def _to_latent_grid(self, features: Tensor, level: int) -> Tensor:
        factor = 2 ** (DWT_LEVELS - level)
        if factor == 1:
            return features
        if self.downsample == "conv":
            return self.resamplers[level - 1](features)
        return F.avg_pool2d(features, factor)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % DOWNSAMPLE_FACTOR or w % DOWNSAMPLE_FACTOR:
            raise ValueError(f"LiteVAE needs H and W divisible by {DOWNSAMPLE_FACTOR}, got {h}x{w}")
        with torch.no_grad():  # the wavelet front end is fixed; nothing upstream of it needs gradients
            bands = dwt_pyramid(x, self.wavelet, DWT_LEVELS, self.wavelet_mode)
        # The DWT is exact in fp32; hand the UNets their own parameter dtype (autocast still applies).
        dtype = self.aggregator.in_layer.weight.dtype
        features = [self._to_latent_grid(self._run(f, b.to(dtype)), level)
                    for level, (f, b) in enumerate(zip(self.extractors, bands), start=1)]
        return self._run(self.aggregator, torch.cat(features, dim=1))

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, wavelet_mode={self.wavelet_mode!r}"

    def _run(self, net: nn.Module, x: Tensor) -> Tensor:
        return maybe_checkpoint(net, x, enabled=self.activation_checkpointing)

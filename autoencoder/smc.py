"""Self-modulated convolution (SMC, LiteVAE Eq. 3) and the GroupNorm-free residual block (App. G).

SMC is StyleGAN2/3 modulation + demodulation with the style vector replaced by a learned parameter:

    w'_ijk = s_i · w_ijk / sqrt(Σ_{i,k} (s_i · w_ijk)² + ε)      (per output channel j)
    y      = gain · conv(x, w') + bias

Because ``s`` does not depend on the sample, one ordinary convolution with the modulated weight is
exactly StyleGAN's per-sample grouped conv, at a fraction of the cost.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SMConv2d(nn.Module):
    """Conv2d whose weight is modulated by learned per-input-channel scales and demodulated per filter.

    Parameter names (``weight``, ``bias``) match ``nn.Conv2d`` so a plain conv's weights can initialise it;
    ``scales`` (s, init 1) and ``gain`` (scalar, init 1) are the SMC additions. At init the layer is a
    conv with unit-L2-norm filters, so its output scale does not grow with fan-in.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, eps: float = 1e-8):
        super().__init__()
        self.stride, self.eps = stride, eps
        self.padding = kernel_size // 2 if padding is None else padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.scales = nn.Parameter(torch.ones(in_channels))
        self.gain = nn.Parameter(torch.ones(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default init; the weight's scale is irrelevant after demodulation, the bias's is not.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight[0].numel()
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def modulated_weight(self) -> Tensor:
        """gain · w' in fp32, even under autocast: a bf16 sum of squares loses the demodulation's precision."""
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            w = self.weight.float() * self.scales.float().view(1, -1, 1, 1)
            w = w * torch.rsqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + self.eps)
            return w * self.gain.float()  # a scalar gain on the weight = a gain on the output (before bias)

    def forward(self, x: Tensor) -> Tensor:
        w = self.modulated_weight().to(x.dtype)
        return F.conv2d(x, w, self.bias.to(x.dtype), stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, stride={self.stride}, padding={self.padding}, eps={self.eps}"


class SMCResnetBlock(nn.Module):
    """SiLU → SMC 3×3 → SiLU → dropout → SMC 3×3, plus the skip; both GroupNorms removed (App. G).

    The skip stays a PLAIN 1×1 conv (``nin_shortcut``) when the width changes, as the authors confirmed.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv1 = SMConv2d(in_channels, out_channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SMConv2d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def shortcut(self, x: Tensor) -> Tensor:
        return self.nin_shortcut(x) if self.in_channels != self.out_channels else x

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(x))
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) + h

"""LDM / ADM-style UNet for latent diffusion: ``UNetModel.forward(x, t, y=None, context=None)``.

Time: sinusoidal embedding of t → 2-layer MLP. Class labels (optional) are embedded and added to the
time embedding; the table has ``num_classes + 1`` rows, the last (index ``num_classes``) being the null
label used for classifier-free-guidance dropout. Attention blocks are spatial transformers: self-attention
+ MLP, plus cross-attention on ``context`` (B, L, context_dim) when ``context_dim`` is set. Output-side
convolutions of every residual branch and of the network are zero-initialised (ADM), so an untrained
network is the identity on its skips and predicts exactly zero.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .checkpointing import Checkpointed
from .norm import group_count


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·f_j), sin(t·f_j)] with f_j = max_period^(-j/half), j < half = dim//2 (zero-padded if dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def norm(channels: int) -> nn.GroupNorm:
    # >= 4 channels per group: with one, GroupNorm would cancel the per-channel time/class embedding added before it
    return nn.GroupNorm(group_count(channels, 32, min_channels=4), channels, eps=1e-5)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(Checkpointed):
    """GN-SiLU-conv, + time embedding (added, or as GroupNorm scale/shift), GN-SiLU-dropout-zero conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1)))
        self.out_norm = norm(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class FeedForward(nn.Module):
    """GEGLU MLP (as in LDM's transformer blocks)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.net(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, optional cross-attention on context, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads, dim_head, dropout)
        self.cross = context_dim is not None
        if self.cross:
            self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads, dim_head, dropout)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.cross:
            if context is None:
                raise ValueError("this UNet was built with context_dim: pass context=(B, L, context_dim)")
            x = x + self.attn2(self.norm2(x), context.to(x.dtype))
        return x + self.ff(self.norm3(x))


class SpatialTransformer(Checkpointed):
    """GN → 1×1 conv to tokens → transformer block → zero 1×1 conv back, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None, dropout: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, heads, channels // heads, context_dim, dropout)
        self.proj_out = zero_(nn.Conv2d(channels, channels, 1))

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        tokens = self.block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Sequential):
    """A sequence of layers; each receives what it needs (time embedding, context, or just x)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Denoising UNet. ``attention_resolutions`` are downsampling factors (LDM convention: [2, 4] puts
    attention at the 1/2 and 1/4 resolution levels); the bottleneck always has attention.
    Heads: ``num_head_channels`` (width per head) wins over ``num_heads``; if neither is given, 64 channels
    per head (at least one head)."""

    def __init__(self, in_channels: int, out_channels: int, model_channels: int, channel_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (2, 4), num_heads: int | None = None,
                 num_head_channels: int | None = None, dropout: float = 0.0, num_classes: int | None = None,
                 context_dim: int | None = None, use_checkpoint: bool = False, use_scale_shift_norm: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.num_classes = in_channels, out_channels, num_classes
        self.model_channels, self.context_dim = model_channels, context_dim
        self._heads_cfg = (num_heads, num_head_channels)
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim)  # last row = null label (CFG)
        res = dict(emb_channels=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm,
                   use_checkpoint=use_checkpoint)
        attn = lambda ch: SpatialTransformer(ch, self._heads(ch), context_dim, dropout, use_checkpoint)  # noqa: E731

        self.input_blocks = nn.ModuleList([Stage(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, out_channels=model_channels * mult, **res)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(Stage(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Stage(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = Stage(ResBlock(ch, **res), attn(ch), ResBlock(ch, **res))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), out_channels=model_channels * mult, **res)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Stage(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @property
    def null_label(self) -> int:
        """Index of the unconditional label (CFG dropout / guidance)."""
        if self.num_classes is None:
            raise AttributeError("this UNet is not class-conditional (num_classes=None)")
        return self.num_classes

    def _heads(self, channels: int) -> int:
        num_heads, head_channels = self._heads_cfg
        if head_channels is not None:
            heads = channels // head_channels
        else:
            heads = num_heads if num_heads is not None else max(1, channels // 64)
        if heads < 1 or channels % heads:
            raise ValueError(f"cannot split {channels} channels into {heads} attention heads")
        return heads

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) with H, W divisible by 2**(len(channel_mult)-1); t: (B,) timesteps; y: (B,) labels."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("class-conditional UNet needs y; pass y=null_label for unconditional samples")
            emb = emb + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

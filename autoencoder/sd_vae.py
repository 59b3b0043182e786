"""Stable Diffusion (LDM KL-f8) first-stage encoder and decoder, the SD-VAE baseline.

Module and parameter names reproduce the original LDM layout (``conv_in``, ``down.{i}.block.{j}``,
``down.{i}.downsample.conv``, ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``, ``up.{i}.block.{j}``,
``up.{i}.upsample.conv``, ``norm_out``, ``conv_out``) so official SD-VAE checkpoints load strictly.
At the default widths (z = 4) the encoder has 34,163,592 and the decoder 49,490,179 parameters.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from autoencoder.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from autoencoder.fused_norm import group_norm_silu
from autoencoder.smc import SMCResnetBlock


def _mid_block(channels: int, block: Callable[[int, int], nn.Module], mid_attention: bool,
               norm_groups: int) -> nn.Module:
    """res → attn → res at the lowest resolution; ``attn_1`` is an ``Identity`` when disabled."""
    mid = nn.Module()
    mid.block_1 = block(channels, channels)
    mid.attn_1 = AttnBlock(channels, norm_groups) if mid_attention else nn.Identity()
    mid.block_2 = block(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """x (B, in_channels, H, W) → moments (B, 2·z_channels, H/f, W/f) with f = 2**(len(ch_mult) - 1).

    ``attn_resolutions`` lists feature-map sizes (relative to ``resolution``) that get self-attention
    after each residual block, as in LDM; SD's KL-f8 uses none, so ``down.{i}.attn`` stays empty.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 4, double_z: bool = True, dropout: float = 0.0,
                 attn_resolutions: Sequence[int] = (), resolution: int = 256, mid_attention: bool = True,
                 norm_groups: int = 32):
        super().__init__()
        self.z_channels, self.num_res_blocks = z_channels, num_res_blocks
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        block = lambda i, o: ResnetBlock(i, o, dropout=dropout, norm_groups=norm_groups)  # noqa: E731
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(block(width, ch * mult))
                width = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(width, norm_groups))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(width)
                res //= 2
            self.down.append(stage)
        self.mid = _mid_block(width, block, mid_attention, norm_groups)
        self.norm_out = Normalize(width, norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(group_norm_silu(h, self.norm_out))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) → image (B, out_channels, h·f, w·f).

    ``up`` is built lowest resolution first but stored so that ``up.{len(ch_mult)-1}`` is the lowest
    resolution and ``up.0`` the full one, exactly as in LDM (the checkpoint keys depend on it).

    ``use_smc=True`` (LiteVAE §4.2, App. G ``ResBlockWithSMC``) swaps EVERY residual block, mid blocks included, for
    ``SMCResnetBlock`` (no GroupNorm). The mid attention keeps its GroupNorm and ``norm_out`` stays
    before ``conv_out``: the paper leaves both unspecified, and SMC is described as a replacement for
    the norm+conv pairs inside residual blocks; keeping them changes the SD decoder least.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 out_channels: int = 3, z_channels: int = 4, dropout: float = 0.0, mid_attention: bool = True,
                 use_smc: bool = False, norm_groups: int = 32):
        super().__init__()
        self.z_channels, self.use_smc = z_channels, use_smc
        self.upsample_factor = 2 ** (len(ch_mult) - 1)
        if use_smc:
            block = lambda i, o: SMCResnetBlock(i, o, dropout=dropout)  # noqa: E731
        else:
            block = lambda i, o: ResnetBlock(i, o, dropout=dropout, norm_groups=norm_groups)  # noqa: E731
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid_block(width, block, mid_attention, norm_groups)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(block(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(width)
            stages.insert(0, stage)  # so that up.0 is the full resolution, as in LDM
        self.up = nn.ModuleList(stages)
        self.norm_out = Normalize(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(group_norm_silu(h, self.norm_out))

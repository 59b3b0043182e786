"""SD (LDM KL-f8) encoder/decoder: published parameter counts, LDM key layout, and the forward pass
against an independent functional re-implementation of the original LDM computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoencoder.sd_vae import Decoder, Encoder

TINY = dict(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=8)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_spec_at_default_widths():
    # The paper's sizes: SD-VAE encoder 34.16M (34,163,592 with double_z, z=4), decoder 49.49M (49,490,179).
    with torch.device("meta"):  # no memory, no init time
        assert n_params(Encoder(z_channels=4, double_z=True)) == 34_163_592
        assert n_params(Decoder(z_channels=4)) == 49_490_179


def test_decoder_up_index_is_lowest_resolution_last():
    with torch.device("meta"):
        dec = Decoder()
    sd = dec.state_dict()
    # LDM prepends each up level, so up.3 is the lowest resolution (512 wide) and up.0 the full one (128 wide).
    assert sd["up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert "up.0.upsample.conv.weight" not in sd and "up.1.upsample.conv.weight" in sd
    assert len(dec.up[0].block) == 3  # num_res_blocks + 1


@pytest.mark.parametrize("ch_mult, factor", [((1, 2, 2, 4), 8), ((1, 2, 4), 4)])
def test_shapes_and_downsampling_factor(ch_mult, factor):
    torch.manual_seed(0)
    enc = Encoder(ch=16, ch_mult=ch_mult, num_res_blocks=1, z_channels=3, norm_groups=8)
    dec = Decoder(ch=16, ch_mult=ch_mult, num_res_blocks=1, z_channels=3, norm_groups=8)
    x = torch.randn(2, 3, 32, 48)
    moments = enc(x)
    assert enc.downsample_factor == dec.upsample_factor == factor
    assert moments.shape == (2, 6, 32 // factor, 48 // factor)
    assert dec(moments[:, :3]).shape == x.shape


def test_optional_attention_keys():
    enc = Encoder(**TINY, attn_resolutions=(8,), resolution=32)  # level 2 of a 32-px input is 8 px
    keys = enc.state_dict().keys()
    assert any(k.startswith("down.2.attn.0.q.") for k in keys)
    assert not any(k.startswith(("down.0.attn", "down.1.attn", "down.3.attn")) for k in keys)
    no_mid = Decoder(**TINY, mid_attention=False).state_dict().keys()
    assert not any("mid.attn_1" in k for k in no_mid)


# ---- independent functional reference of the LDM forward pass (ldm/modules/diffusionmodules/model.py) ----

def ref_gn(x, p, prefix, groups):
    return F.group_norm(x, groups, p[prefix + ".weight"], p[prefix + ".bias"], eps=1e-6)


def ref_conv(x, p, prefix, **kw):
    return F.conv2d(x, p[prefix + ".weight"], p[prefix + ".bias"], **kw)


def ref_resblock(x, p, pre, groups):
    h = ref_conv(F.silu(ref_gn(x, p, pre + ".norm1", groups)), p, pre + ".conv1", padding=1)
    h = ref_conv(F.silu(ref_gn(h, p, pre + ".norm2", groups)), p, pre + ".conv2", padding=1)
    skip = ref_conv(x, p, pre + ".nin_shortcut") if pre + ".nin_shortcut.weight" in p else x
    return skip + h


def ref_attn(x, p, pre, groups):
    # LDM's explicit bmm + softmax attention, not SDPA.
    b, c, hh, ww = x.shape
    hn = ref_gn(x, p, pre + ".norm", groups)
    q, k, v = (ref_conv(hn, p, f"{pre}.{n}").reshape(b, c, hh * ww) for n in "qkv")
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + ref_conv(out, p, pre + ".proj_out")


def ref_encoder(x, p, levels, nblocks, groups, attn_levels=()):
    h = ref_conv(x, p, "conv_in", padding=1)
    for i in range(levels):
        for j in range(nblocks):
            h = ref_resblock(h, p, f"down.{i}.block.{j}", groups)
            if i in attn_levels:
                h = ref_attn(h, p, f"down.{i}.attn.{j}", groups)
        if i != levels - 1:
            h = ref_conv(F.pad(h, (0, 1, 0, 1)), p, f"down.{i}.downsample.conv", stride=2)
    h = ref_resblock(h, p, "mid.block_1", groups)
    h = ref_resblock(ref_attn(h, p, "mid.attn_1", groups), p, "mid.block_2", groups)
    return ref_conv(F.silu(ref_gn(h, p, "norm_out", groups)), p, "conv_out", padding=1)


def ref_decoder(z, p, levels, nblocks, groups):
    h = ref_resblock(ref_conv(z, p, "conv_in", padding=1), p, "mid.block_1", groups)
    h = ref_resblock(ref_attn(h, p, "mid.attn_1", groups), p, "mid.block_2", groups)
    for i in reversed(range(levels)):
        for j in range(nblocks + 1):
            h = ref_resblock(h, p, f"up.{i}.block.{j}", groups)
        if i != 0:
            h = ref_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), p, f"up.{i}.upsample.conv", padding=1)
    return ref_conv(F.silu(ref_gn(h, p, "norm_out", groups)), p, "conv_out", padding=1)


def test_encoder_matches_ldm_reference_computation():
    torch.manual_seed(0)
    enc = Encoder(**TINY, attn_resolutions=(16,), resolution=32).eval()  # attention at level 1 (16 px)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref_encoder(x, enc.state_dict(), levels=4, nblocks=1, groups=8, attn_levels=(1,))
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-5)


def test_decoder_matches_ldm_reference_computation():
    torch.manual_seed(0)
    dec = Decoder(**TINY).eval()
    z = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        expected = ref_decoder(z, dec.state_dict(), levels=4, nblocks=1, groups=8)
        torch.testing.assert_close(dec(z), expected, rtol=1e-4, atol=1e-5)

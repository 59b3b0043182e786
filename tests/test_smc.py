"""Self-modulated convolution against Eq. 3 of the LiteVAE paper, and the SMC decoder's structure/size."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.sd_vae import Decoder
from autoencoder.smc import SMConv2d, SMCResnetBlock


def eq3_reference(x, weight, scales, gain, bias, eps, padding):
    """Eq. 3 in float64 with explicit loops over output channels j and sums over (i, k); conv via unfold."""
    x, weight, scales = x.double(), weight.double(), scales.double()
    out_ch, in_ch, kh, kw = weight.shape
    w_mod = torch.empty_like(weight)
    for j in range(out_ch):
        sw = torch.einsum("i,ik->ik", scales, weight[j].reshape(in_ch, kh * kw))  # s_i · w_ijk
        w_mod[j] = (sw / torch.sqrt((sw**2).sum() + eps)).reshape(in_ch, kh, kw)
    patches = F.unfold(x, (kh, kw), padding=padding)  # (B, i·k, P)
    y = torch.einsum("jn,bnp->bjp", w_mod.reshape(out_ch, -1), patches)
    y = gain.double() * y + bias.double()[None, :, None]
    return y.reshape(x.shape[0], out_ch, x.shape[2] + 2 * padding - kh + 1, -1)


def randomise(layer: SMConv2d) -> None:
    with torch.no_grad():
        layer.scales.copy_(torch.rand_like(layer.scales) * 2 + 0.1)
        layer.gain.fill_(1.7)
        layer.bias.normal_()


def test_output_matches_eq3_with_random_scales_gain_bias():
    torch.manual_seed(0)
    layer = SMConv2d(5, 7, 3, eps=1e-3)  # large eps so that eps is actually tested
    randomise(layer)
    x = torch.randn(2, 5, 6, 9)
    expected = eq3_reference(x, layer.weight, layer.scales, layer.gain, layer.bias, 1e-3, padding=1)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_init_is_conv_with_unit_norm_filters():
    torch.manual_seed(0)
    layer = SMConv2d(6, 4, 3)
    x = torch.randn(2, 6, 8, 8)
    w_unit = layer.weight / layer.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(layer(x), F.conv2d(x, w_unit, layer.bias, padding=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.modulated_weight().flatten(1).norm(dim=1), torch.ones(4))


def test_output_scale_independent_of_fan_in():
    torch.manual_seed(0)
    stds_smc, stds_plain = [], []
    for fan_in in (16, 1024):
        layer = SMConv2d(fan_in, 32, 1)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.zero_()
        x = torch.randn(4, fan_in, 16, 16)
        with torch.no_grad():
            stds_smc.append(layer(x).std().item())
            stds_plain.append(F.conv2d(x, layer.weight).std().item())
    # Unit-norm filters on unit-variance inputs: output std ~ 1 whatever the fan-in; a plain conv grows ~ sqrt(fan_in).
    assert all(0.85 < s < 1.15 for s in stds_smc), stds_smc
    assert stds_plain[1] / stds_plain[0] > 6.0  # sqrt(1024 / 16) = 8


def test_weight_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = SMConv2d(64, 16, 3)
    randomise(layer)
    x = torch.randn(2, 64, 8, 8)
    reference_w = layer.modulated_weight()
    reference_y = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.modulated_weight()
        y = layer(x)
    assert w.dtype == torch.float32 and torch.equal(w, reference_w)
    assert y.dtype == torch.bfloat16  # the conv itself does run in bf16
    torch.testing.assert_close(y.float(), reference_y, rtol=3e-2, atol=3e-2)
    # bf16 parameters (e.g. a model cast with .to(bfloat16)) are still normalised in fp32.
    rounded = SMConv2d(64, 16, 3)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in layer.state_dict().items()})
    w_bf16_params = layer.to(torch.bfloat16).modulated_weight()
    assert w_bf16_params.dtype == torch.float32 and torch.equal(w_bf16_params, rounded.modulated_weight())


def test_plain_conv_weights_load_and_grads_reach_scales_and_gain():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = SMConv2d(3, 5, 3)
    missing, unexpected = layer.load_state_dict(conv.state_dict(), strict=False)
    assert sorted(missing) == ["gain", "scales"] and not unexpected
    randomise(layer)
    layer(torch.randn(1, 3, 4, 4)).square().sum().backward()
    assert layer.scales.grad.abs().sum() > 0 and layer.gain.grad.abs().sum() > 0


def test_smc_resblock_matches_manual_composition():
    torch.manual_seed(0)
    block = SMCResnetBlock(4, 6).eval()
    assert isinstance(block.nin_shortcut, nn.Conv2d) and not isinstance(block.nin_shortcut, SMConv2d)
    assert not any(isinstance(m, nn.GroupNorm) for m in block.modules())
    x = torch.randn(2, 4, 5, 5)
    h = block.conv2(F.silu(block.conv1(F.silu(x))))
    torch.testing.assert_close(block(x), block.nin_shortcut(x) + h)


def test_smc_decoder_has_no_groupnorm_in_residual_blocks_and_expected_size():
    with torch.device("meta"):
        dec = Decoder(use_smc=True)
    res_blocks = [m for name, m in dec.named_modules() if re.fullmatch(r"mid\.block_\d|up\.\d\.block\.\d", name)]
    assert len(res_blocks) == 14 and all(isinstance(m, SMCResnetBlock) for m in res_blocks)
    gn_names = [name for name, m in dec.named_modules() if isinstance(m, nn.GroupNorm)]
    assert gn_names == ["mid.attn_1.norm", "norm_out"]  # kept on purpose (the paper leaves them open)
    # (in, out) widths of every residual block of the default SD decoder: mid ×2, then up.3 → up.0.
    widths = [(512, 512)] * 2 + [(512, 512)] * 3 + [(512, 512)] * 3 \
        + [(512, 256), (256, 256), (256, 256)] + [(256, 128), (128, 128), (128, 128)]
    removed_gn = sum(2 * i + 2 * o for i, o in widths)  # norm1 over `in`, norm2 over `out`, weight + bias
    added = sum(i + o + 2 for i, o in widths)  # scales of conv1 (in) and conv2 (out), one gain each
    assert sum(p.numel() for p in dec.parameters()) == 49_490_179 - removed_gn + added

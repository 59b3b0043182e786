"""Autoencoder: official SD-VAE key layout, strict checkpoint loading, and the encode/decode API with
both encoders (SD and LiteVAE)."""
from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from autoencoder.model import Autoencoder
from ldm.first_stage.posterior import DiagonalGaussian

SD_ENCODER = {"target": "autoencoder.sd_vae.Encoder", "params": {"z_channels": 4}}
SD_DECODER = {"target": "autoencoder.sd_vae.Decoder", "params": {"z_channels": 4}}
TINY_WIDTHS = {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "norm_groups": 4}
TINY_SD_ENCODER = {"target": "autoencoder.sd_vae.Encoder", "params": {**TINY_WIDTHS, "z_channels": 3}}
TINY_DECODER = {"target": "autoencoder.sd_vae.Decoder", "params": {**TINY_WIDTHS, "z_channels": 3}}
TINY_LITEVAE = {"target": "autoencoder.litevae_encoder.LiteVAEEncoder",
                "params": {"z_channels": 3, "size": None, "extractor_channels": 8, "extractor_mult": [1, 2],
                           "aggregator_channels": 8, "aggregator_mult": [1, 2], "norm_groups": 8}}

# Shapes read from CompVis/latent-diffusion ldm/modules/diffusionmodules/model.py (Encoder/Decoder/ResnetBlock/
# AttnBlock/Downsample/Upsample) with the KL-f8 config: ch 128, ch_mult (1,2,4,4), 2 res blocks, z 4, double_z.
OFFICIAL_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.1.block.1.conv1.weight": (256, 256, 3, 3),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.down.3.block.1.conv2.bias": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.block_2.norm2.bias": (512,),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.0.block.0.norm1.weight": (256,),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
}
ABSENT_IN_OFFICIAL = ["encoder.down.3.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
                      "encoder.down.0.block.0.nin_shortcut.weight", "decoder.up.3.block.0.nin_shortcut.weight"]
# Hand count from the LDM code: a ResnetBlock has 8 tensors (+2 with nin_shortcut), AttnBlock 10, a conv 2.
# Encoder: conv_in 2 + down (16 + 18 + 18 + 16 + 3 downsample·2) + mid 26 + norm_out 2 + conv_out 2 = 106.
# Decoder: conv_in 2 + mid 26 + up (26 + 26 + 28 + 26) + norm_out 2 + conv_out 2 = 138. Quant convs: 4.
OFFICIAL_KEY_COUNT = 106 + 138 + 4


def tiny_model(encoder=TINY_SD_ENCODER, **kw) -> Autoencoder:
    """Through the config factory (``ckpt_path`` in ``kw`` is read there, as from a config)."""
    torch.manual_seed(0)
    return Autoencoder.from_params(encoder_config=encoder, decoder_config=TINY_DECODER, z_channels=3, **kw).eval()


def test_sd_baseline_has_official_key_names_and_shapes():
    with torch.device("meta"):
        model = Autoencoder(SD_ENCODER, SD_DECODER, z_channels=4, use_quant_conv=True)
    sd = model.state_dict()
    assert {k: tuple(sd[k].shape) for k in OFFICIAL_SHAPES if k in sd} == OFFICIAL_SHAPES
    assert not [k for k in ABSENT_IN_OFFICIAL if k in sd]
    assert len(sd) == OFFICIAL_KEY_COUNT


def lightning_checkpoint(model: Autoencoder) -> dict:
    state = dict(model.state_dict())
    # Official full first-stage checkpoints also hold the LPIPS + discriminator weights under loss.*.
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 8, 1, 1)
    return {"state_dict": state, "global_step": 7, "epoch": 1}


@pytest.mark.parametrize("use_quant_conv", [False, True])
def test_lightning_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path, caplog, use_quant_conv):
    source = tiny_model(use_quant_conv=use_quant_conv)
    path = tmp_path / "first_stage.ckpt"
    torch.save(lightning_checkpoint(source), path)
    torch.load(path, weights_only=True)  # the file is loadable without unpickling arbitrary objects
    with caplog.at_level(logging.INFO, logger="autoencoder.model"):
        loaded = Autoencoder.from_params(encoder_config=TINY_SD_ENCODER, decoder_config=TINY_DECODER, z_channels=3,
                                         use_quant_conv=use_quant_conv, ckpt_path=str(path)).eval()
    assert "dropped 2 non-autoencoder keys" in caplog.text and "loss.*: 2" in caplog.text
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sample_posterior=False)[0], source(x, sample_posterior=False)[0])


def test_safetensors_checkpoint_loads(tmp_path):
    source = tiny_model()
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = tiny_model()
    with torch.no_grad():
        loaded.decoder.conv_out.weight.zero_()
    loaded.load_sd_checkpoint(path)
    assert torch.equal(loaded.decoder.conv_out.weight, source.decoder.conv_out.weight)


def test_missing_or_renamed_key_is_named_in_the_error(tmp_path):
    ckpt = lightning_checkpoint(tiny_model())
    del ckpt["state_dict"]["decoder.conv_out.bias"]
    w = ckpt["state_dict"].pop("encoder.mid.attn_1.q.weight")
    ckpt["state_dict"]["encoder.mid.attn_1.query.weight"] = w
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError) as err:
        tiny_model().load_sd_checkpoint(path)
    message = str(err.value)
    assert "decoder.conv_out.bias" in message and "encoder.mid.attn_1.q.weight" in message
    assert "encoder.mid.attn_1.query.weight" in message  # the unexpected one is named too


def test_ignore_keys_keep_fresh_weights(tmp_path):
    source = tiny_model()
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {k: v for k, v in source.state_dict().items() if not k.startswith("decoder.conv_out")}},
               path)
    torch.manual_seed(1)
    target = Autoencoder(TINY_SD_ENCODER, TINY_DECODER, z_channels=3)
    fresh = target.decoder.conv_out.weight.detach().clone()
    target.load_sd_checkpoint(path, ignore_keys=["decoder.conv_out"])
    assert torch.equal(target.decoder.conv_out.weight, fresh)
    assert torch.equal(target.encoder.conv_in.weight, source.encoder.conv_in.weight)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        tiny_model(ckpt_path=str(tmp_path / "nope.ckpt"))


@pytest.mark.parametrize("encoder", [TINY_SD_ENCODER, TINY_LITEVAE], ids=["sd", "litevae"])
def test_encode_decode_api_with_either_encoder(encoder):
    model = tiny_model(encoder=OmegaConf.create(encoder))  # configs usually arrive as OmegaConf nodes
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussian)
    assert model.downsample_factor == 8
    for t in (posterior.mean, posterior.std, posterior.logvar, posterior.mode()):
        assert t.shape == (2, 3, 4, 3)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    assert posterior.kl().shape == (2,)
    assert model.decode(posterior.sample()).shape == x.shape
    xrec, post = model(x, sample_posterior=False)
    torch.testing.assert_close(xrec, model.decode(post.mean))
    assert model.last_layer is model.decoder.conv_out.weight
    assert not hasattr(model, "quant_conv")  # LiteVAE default: no 1×1 convs (Table 17)


def test_gradients_reach_last_layer_and_encoder():
    model = tiny_model(encoder=TINY_LITEVAE).train()
    xrec, posterior = model(torch.rand(1, 3, 16, 16) * 2 - 1)
    (xrec.abs().mean() + posterior.kl().mean()).backward()
    assert model.last_layer.grad is not None and model.last_layer.grad.abs().sum() > 0
    assert model.encoder.aggregator.out_layer.weight.grad.abs().sum() > 0


def test_mismatched_latent_channels_fail_at_build():
    with pytest.raises(ValueError, match="z_channels"):
        Autoencoder(TINY_SD_ENCODER, TINY_DECODER, z_channels=4)

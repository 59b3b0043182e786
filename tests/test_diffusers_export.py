"""LiteVAE as a diffusers model: export --format diffusers, from_pretrained, AutoencoderKL's interface,
a diffusers pipeline (DiTPipeline) and VaeImageProcessor using it as their vae, all equal to our own model.
Tiny random weights, nothing downloads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, Transformer2DModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from autoencoder.diffusers_model import LiteVAEModel
from conftest import command_module
from ldm.checkpoints import load_first_stage
from ldm.tiling import encode_tiled


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "litevae"
    assert command_module("export").main([str(run_dir), "--format", "diffusers", "--scaling-factor", "0.5",
                                          "--out", str(out)]) == 0
    ours, _ = load_first_stage(run_dir, use_ema=True)
    return out, ours


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_from_pretrained_equals_our_model(exported):
    folder, ours = exported
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "LiteVAEModel"
    vae = LiteVAEModel.from_pretrained(folder).eval()
    assert vae.config.scaling_factor == 0.5 and vae.config.force_upcast
    x = images()
    with torch.no_grad():
        dist, mine = vae.encode(x).latent_dist, ours.encode(x)
        assert torch.allclose(dist.mode(), mine.mode(), atol=1e-5) and torch.allclose(dist.mean, mine.mean, atol=1e-5)
        assert torch.allclose(dist.logvar, mine.logvar, atol=1e-5)
        z = mine.mode()
        assert torch.allclose(vae.decode(z).sample, ours.decode(z), atol=1e-5)
        assert torch.allclose(vae(x).sample, ours.decode(z), atol=1e-5)
        vae.enable_slicing()
        assert torch.allclose(vae.decode(z).sample, ours.decode(z), atol=1e-5)
        big = images(1, 96)
        vae.enable_tiling()
        vae.register_to_config(tile_sample_size=64, tile_overlap=16)
        assert torch.allclose(vae.encode(big).latent_dist.mean, encode_tiled(ours, big, 64, 16).mean, atol=1e-5)


def test_every_first_stage_option_reads_the_folder_back(exported):
    folder, ours = exported
    model, info = load_first_stage(folder)
    assert info["config"]["target"] == "diffusers.LiteVAEModel" and info["scaling"] == {"scaling_factor": 0.5}
    x = images()
    with torch.no_grad():
        assert torch.allclose(model.encode(x).mode(), ours.encode(x).mode(), atol=1e-5)
    assert model.downsample_factor == ours.downsample_factor


def test_a_diffusers_pipeline_decodes_with_it(exported):
    """DiTPipeline(transformer, vae, scheduler): its images are our decoder's output on the pipeline's latents."""
    folder, ours = exported
    vae = LiteVAEModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    transformer = Transformer2DModel(sample_size=4, num_layers=1, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, in_channels=4, out_channels=8,
                                     activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                                     norm_type="ada_norm_zero", norm_elementwise_affine=False)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDIMScheduler())
    seen = []
    decode = vae.decode
    vae.decode = lambda z, **kw: (seen.append(z.clone()), decode(z, **kw))[1]
    out = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        expected = (ours.decode(seen[0]) / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, expected, atol=1e-5)


def test_the_image_processor_round_trip_matches_ours(exported):
    folder, ours = exported
    vae = LiteVAEModel.from_pretrained(folder).eval()
    processor = VaeImageProcessor(vae_scale_factor=vae.downsample_factor)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    x = processor.preprocess(picture)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        theirs = processor.postprocess(vae.decode(z / vae.config.scaling_factor).sample, output_type="pt")
        mine = processor.postprocess(ours.decode(ours.encode(x).mode()), output_type="pt")
    assert torch.allclose(theirs, mine, atol=1e-5)

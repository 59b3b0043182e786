"""fp16 first-stage calls never return NaN/inf silently: an overflowing batch is redone in fp32, warned once."""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import LITEVAE_TINY
from ldm.data.images import ImageFolder
from ldm.cache.writer import CacheOptions, cache_rank
from ldm.precision import GuardedAutoencoder, autocast
from ldm.tiling import TiledAutoencoder, encode_tiled
from ldm.util import instantiate_from_config


def overflowing_model() -> torch.nn.Module:
    """The tiny LiteVAE with a conv ahead of a GroupNorm scaled up (1e5 in the encoder, 1e7 in the decoder): fp32
    normalises the huge activations away (the decoder's at norm_out); fp16 (max 65504) makes them inf, then NaN."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(LITEVAE_TINY).model.params.autoencoder).eval()
    with torch.no_grad():
        model.encoder.aggregator.down[0].conv1.weight.mul_(1e5)
        model.decoder.conv_in.weight.mul_(1e7)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return overflowing_model()


def test_the_model_really_overflows_in_fp16(model):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        posterior = model.encode(x)
        assert not torch.isfinite(posterior.mean).all()
        assert not torch.isfinite(model.decode(torch.randn(1, 4, 4, 4))).all()


def test_guard_recomputes_in_fp32_and_warns_once(model, caplog):
    guard = GuardedAutoencoder(model, "fp16")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="ldm.precision"):
        for x in batches:
            posterior = guard.encode(x)
            rec = guard.decode(posterior.mean)
            with torch.no_grad():
                ref = model.encode(x)
                ref_rec = model.decode(ref.mean)
            assert torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.std).all()
            assert torch.isfinite(rec).all()
            torch.testing.assert_close(posterior.mean, ref.mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(posterior.std, ref.std, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(rec.float(), ref_rec, rtol=1e-4, atol=1e-4)
    assert guard.fallbacks == 6  # every encode and decode overflowed
    assert len([r for r in caplog.records if "NaN/inf" in r.getMessage()]) == 1


def test_guard_composes_with_tiling(model):
    """Each tile is guarded on its own, so a tiled fp16 encode is finite too."""
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    posterior = TiledAutoencoder(GuardedAutoencoder(model, "fp16"), tile=32, overlap=16).encode(x)
    assert torch.isfinite(posterior.mean).all()


def test_finite_fp16_is_kept_and_fp32_leaves_outer_autocast():
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(LITEVAE_TINY).model.params.autoencoder).eval()
    guard = GuardedAutoencoder(model, "fp16")
    out = guard.decode(torch.randn(1, 4, 4, 4))
    assert guard.fallbacks == 0 and out.dtype == torch.float16  # fp16 really ran
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer (UNet) autocast does not reach an fp32 decode
        assert GuardedAutoencoder(model, "fp32").decode(torch.randn(1, 4, 4, 4)).dtype == torch.float32


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        GuardedAutoencoder(torch.nn.Identity(), "fp8")
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "int8")


def _cached_means(folder: Path) -> dict[str, np.ndarray]:
    means = {}
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".mean.npy"):
                    means[member.name[:-len(".mean.npy")]] = np.load(io.BytesIO(tf.extractfile(member).read()))
    return means


def _image_folder(root: Path, size: int, n: int) -> ImageFolder:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return ImageFolder(root, size=size)


def test_cache_latents_fp16_is_finite_and_equals_fp32(model, tmp_path, caplog):
    """--precision fp16 in the latent cache: overflowing batches are stored as their fp32 encoding, warned once."""
    (tmp_path / "img").mkdir()
    dataset = _image_folder(tmp_path / "img", 32, 2)
    caches = {}
    with caplog.at_level(logging.WARNING, logger="ldm.precision"):
        for precision in ("fp16", "fp32"):
            opts = CacheOptions(out_dir=str(tmp_path / precision), batch_size=1, precision=precision, dtype="float32")
            cache_rank(model, dataset, opts)
            caches[precision] = _cached_means(tmp_path / precision)
    assert len([r for r in caplog.records if "NaN/inf" in r.getMessage()]) == 1  # two batches, one warning
    assert caches["fp16"].keys() == caches["fp32"].keys() and len(caches["fp16"]) == 2
    for key, mean in caches["fp16"].items():
        assert np.isfinite(mean).all()
        np.testing.assert_allclose(mean, caches["fp32"][key], rtol=1e-4, atol=1e-4)


def test_cache_latents_tiled(tmp_path):
    """CacheOptions.tile encodes by tiles (ldm.tiling): the stored mean is encode_tiled's."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(LITEVAE_TINY).model.params.autoencoder).eval()
    (tmp_path / "img").mkdir()
    dataset = _image_folder(tmp_path / "img", 64, 1)
    cache_rank(model, dataset, CacheOptions(out_dir=str(tmp_path / "out"), tile=32, tile_overlap=16, dtype="float32"))
    (stored,) = _cached_means(tmp_path / "out").values()
    expected = encode_tiled(model, dataset[0]["image"][None], 32, 16).mean[0].numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="precision"):
        CacheOptions(out_dir=str(tmp_path), precision="fp8")

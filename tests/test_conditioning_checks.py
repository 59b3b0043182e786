"""Conditioning and latent-shape mismatches are refused before step 0, naming the config keys to change (before,
a class-conditional config on an unlabelled cache died at step 1 with ``KeyError: ... no 'cls' labels``, and
``conditioning=none`` alone with ``ValueError: class-conditional UNet needs y``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from ldm import cli
from ldm.checkpoints import load_first_stage
from ldm.data.images import ImageFolder
from ldm.cache.writer import CacheOptions, cache_latents
from ldm.util import ConfigError
from helpers import SIZE, make_cache, make_images, make_stage1_run, stage2_config, write_config

UNCOND = str(ROOT / "configs/ldm/uncond_small.yaml")
UNCOND_DIT = str(ROOT / "configs/ldm/uncond_small_dit_flow.yaml")
CLASS_TINY = str(ROOT / "configs/ldm/fmnist_litevae_tiny.yaml")
SHORT = ["lightning.trainer.max_steps=1", "data.params.batch_size=4", "lightning.trainer.enable_progress_bar=false",
         "lightning.logger.tensorboard=null"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """A labelled + captioned cache, and one of the same images without labels or captions."""
    root = tmp_path_factory.mktemp("caches")
    images, captions = make_images(root / "images")
    stage1 = make_stage1_run(root / "stage1")
    plain = root / "plain"
    model, info = load_first_stage(stage1)
    for split in ("train", "validation"):
        cache_latents(model, info, ImageFolder(images, size=SIZE), CacheOptions(str(plain), split, samples_per_shard=8),
                      {"target": "ldm.data.ImageFolder", "params": {"root": str(images), "size": SIZE}})
    return {"labelled": make_cache(stage1, images, captions, root / "labelled"), "plain": plain}


def train(tmp_path: Path, config: str, *overrides: str) -> None:
    cli.main(["--base", config, "-t", "-l", str(tmp_path / "logs"), *SHORT, *overrides])


def no_step_taken(tmp_path: Path) -> bool:
    return not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))


def test_class_conditional_config_on_an_unlabelled_cache(caches, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(tmp_path, CLASS_TINY, f"latents={caches['plain']}")
    message = str(err.value)
    for key in ("model.params.conditioning=none", "model.params.unet_config.params.num_classes=null",
                "configs/ldm/uncond_small.yaml", "data.params.train (LatentShards)", "labels_from_subfolders"):
        assert key in message, (key, message)
    assert no_step_taken(tmp_path)


def test_unconditional_with_a_class_conditional_backbone(caches, tmp_path):
    with pytest.raises(ConfigError, match=r"conditioning=none but the backbone is class-conditional "
                                          r"\(model\.params\.unet_config\.params\.num_classes=10\).*num_classes=null"):
        train(tmp_path, CLASS_TINY, f"latents={caches['labelled']}", "model.params.conditioning=none")
    assert no_step_taken(tmp_path)


def test_class_conditioning_with_an_unconditional_backbone(caches, tmp_path):
    with pytest.raises(ConfigError, match=r"conditioning=class needs a class-conditional backbone: set "
                                          r"model\.params\.unet_config\.params\.num_classes="):
        train(tmp_path, UNCOND, f"latents={caches['labelled']}", "model.params.conditioning=class")


def test_text_conditioning_without_captions(caches, tmp_path):
    config = write_config(stage2_config(caches["plain"], "text"), tmp_path / "text.yaml")
    with pytest.raises(ConfigError, match=r"conditioning=text needs captions \('txt'\).*model\.params\.conditioning=none"):
        train(tmp_path, config)
    assert no_step_taken(tmp_path)


def test_cached_model_on_image_data(caches, tmp_path):
    config = stage2_config(caches["plain"], "none")
    config["data"]["params"]["train"] = {"target": "ldm.data.ImageFolder",
                                         "params": {"root": str(caches["plain"].parent / "images"), "size": SIZE}}
    with pytest.raises(ConfigError, match=r"input=cached trains on cached latents, but data\.params\.train "
                                          r"\(ImageFolder\) has samples with \['image', 'key'\]"):
        train(tmp_path, write_config(config, tmp_path / "c.yaml"))


@pytest.mark.parametrize("override, expected", [
    ("model.params.unet_config.params.in_channels=3", r"in_channels=3 but the latents have 4 channels.*in_channels=4"),
    ("model.params.unet_config.params.input_size=8", r"input_size=\[8, 8\] but the latents are \[4, 4\].*input_size=4"),
])
def test_backbone_that_does_not_fit_the_latents(caches, tmp_path, override, expected):
    config = UNCOND_DIT if "input_size" in override else UNCOND
    with pytest.raises(ConfigError, match=expected):
        train(tmp_path, config, f"latents={caches['plain']}", override)


@pytest.mark.parametrize("config", [UNCOND, UNCOND_DIT])
def test_unconditional_configs_train_on_an_unlabelled_cache(caches, tmp_path, config):
    train(tmp_path, config, f"latents={caches['plain']}", "model.params.unet_config.params.input_size=4"
          if config == UNCOND_DIT else "model.params.sample_steps=4", "model.params.sample_steps=4")
    assert list((tmp_path / "logs").glob("*/checkpoints/last.ckpt"))

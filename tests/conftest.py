"""Shared test helpers: the tiny stage-1 configs shrunk further so a training step takes well under a second."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lab.stages import script

ROOT = Path(__file__).resolve().parents[1]
LITEVAE_TINY = str(ROOT / "configs/autoencoder/litevae_tiny.yaml")
SD_VAE_TINY = str(ROOT / "configs/autoencoder/sd_vae_tiny.yaml")

# 32x32 Fashion-MNIST subsets, batch 4, discriminator on from step 2, no TensorBoard files.
STAGE1_TEST_OVERRIDES = [
    "data.params.batch_size=4",
    "data.params.train.params.size=32", "data.params.train.params.limit=64",
    "data.params.validation.params.size=32", "data.params.validation.params.limit=8",
    "lightning.trainer.limit_val_batches=1", "lightning.trainer.val_check_interval=2",
    "lightning.trainer.log_every_n_steps=1", "lightning.trainer.enable_progress_bar=false",
    "lightning.logger.tensorboard=null",
    "model.params.loss.params.disc_start=2",
]


@pytest.fixture(autouse=True)
def _small_torch():
    """Two cores are shared by two pytest workers: one intra-op thread each avoids oversubscription."""
    torch.set_num_threads(1)
    yield


def command_module(name: str):
    """``scripts/<name>.py``'s code: its parser and ``main``, loaded as the pipeline's stages load it."""
    return script(name)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LITEVAE_RUN_TIME", None)
    return env


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests need a GPU: where none is visible they are deselected (not skipped), so that the
    CPU suite reports what it ran; ``scripts/gpu_check.sh`` runs them with ``-m cuda`` on a GPU machine."""
    if torch.cuda.is_available():
        return
    needs_gpu = [item for item in items if item.get_closest_marker("cuda") is not None]
    if needs_gpu:
        config.hook.pytest_deselected(items=needs_gpu)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]

# ------------------------------------------------------------------------------------ shared fixtures
# Module-scoped: each test module that asks for them builds its own (a tiny random LiteVAE run folder and images,
# its latent cache; the stage-2 tests' images, stage-1 run and cache).


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 small PNGs of varied size in two class folders, plus one corrupt file."""
    from helpers import N_GOOD
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        h, w = int(rng.integers(32, 48)), int(rng.integers(32, 48))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img.{i:02d}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, images) -> Path:
    """A fake stage-1 run folder: project config + Lightning-style checkpoint with live and EMA weights."""
    from helpers import AE_CONFIG, data_config
    from ldm.util import instantiate_from_config
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    live = instantiate_from_config(AE_CONFIG)
    ema = copy.deepcopy(live)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {**{f"autoencoder.{k}": v for k, v in live.state_dict().items()},
             **{f"ema.module.{k}": v for k, v in ema.state_dict().items()},
             "ema.num_updates": torch.tensor(3), "loss.discriminator.w": torch.zeros(2)}
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": state, "global_step": 3}, run / "checkpoints" / "last.ckpt")
    project = {"model": {"target": "autoencoder.lightning.AutoencoderModule", "params": {"autoencoder": AE_CONFIG}},
               "data": {"target": "ldm.data.DataModule", "params": {"batch_size": 4, "train": data_config(images)}}}
    (run / "configs").mkdir()
    (run / "configs" / "2024-01-01T00-00-00-project.yaml").write_text(yaml.safe_dump(project))
    torch.save(ema.state_dict(), run / "ema_reference.pt")
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    from ldm.checkpoints import load_first_stage

    return load_first_stage(run_dir)


@pytest.fixture(scope="module")
def dataset(images):
    from helpers import SIZE
    from ldm.data.images import ImageFolder

    return ImageFolder(images, size=SIZE, labels_from_subfolders=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, model, dataset, images) -> Path:
    from helpers import run_cache

    out = tmp_path_factory.mktemp("cache")
    run_cache(model, dataset, images, out, flip=True)
    return out


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Images, a random stage-1 run and its latent cache, for the stage-2 tests."""
    from helpers import make_cache, make_images, make_stage1_run

    root = tmp_path_factory.mktemp("ldm")
    images, captions = make_images(root / "images")
    stage1 = make_stage1_run(root / "stage1")
    return {"images": images, "captions": captions, "stage1": stage1,
            "cache": make_cache(stage1, images, captions, root / "cache")}

"""Shared test helpers: the tiny stage-1 configs shrunk further so a training step takes well under a second."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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

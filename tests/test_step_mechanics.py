"""One step mechanic for both stages: the EMA updates once per optimizer step (never per micro-batch) and
mid-run checkpoints already hold that step's EMA; stage 1's ``global_step`` counts autoencoder steps only with the
discriminator on, through no patch of Lightning's private hooks; the run's ``-s`` seeds stage-2 training noise.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision

from autoencoder.lightning import AutoencoderModule
from helpers import (adam_steps, build, build_module, image_batch, load_ckpt, make_cache, make_images,
                     make_stage1_run, stage2_config, train, trainer)

STEPS = 3


def step_checkpoints(folder: Path) -> dict[int, dict]:
    """{global_step: checkpoint} of the periodic ``step=...`` checkpoints in ``folder``."""
    return {c["global_step"]: c for c in map(load_ckpt, folder.glob("step=*.ckpt"))}


# ------------------------------------------------------------------------------------------- stage 1
@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> tuple[Path, list[bool]]:
    """3 steps of 2 micro-batches, the discriminator on from step 0, a checkpoint after every step. Also records,
    after each optimizer step, whether the step hooks Lightning installed on both optimizers are still its own."""
    untouched: list[bool] = []
    original = AutoencoderModule._step

    def step(self, optimizer):
        original(self, optimizer)
        untouched.append(optimizer._on_before_step == self.optimizers()[0]._on_before_step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoencoderModule, "_step", step)
        run = train(tmp_path_factory.mktemp("stage1"), "model.params.accumulate_grad_batches=2",
                    "model.params.loss.params.disc_start=0", "lightning.checkpoint.every_n_train_steps=1",
                    f"lightning.trainer.max_steps={STEPS}")
    return run, untouched


def test_stage1_global_step_counts_autoencoder_steps_without_patching_lightning(stage1_run):
    run, untouched = stage1_run
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    assert adam_steps(last, 0) == adam_steps(last, 1) == STEPS  # the discriminator stepped every time, uncounted
    assert len(untouched) == 2 * STEPS and all(untouched)


def test_stage1_ema_once_per_optimizer_step_in_every_checkpoint(stage1_run):
    ckpts = step_checkpoints(stage1_run[0] / "checkpoints")
    assert sorted(ckpts) == list(range(1, STEPS + 1))
    for step, ckpt in ckpts.items():
        assert int(ckpt["state_dict"]["ema.num_updates"]) == adam_steps(ckpt, 0) == step


def test_stage1_refuses_a_grad_scaler():
    """fp16 would need a grad scaler, which never sees the discriminator's (uncounted) steps."""
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    data = torch.utils.data.DataLoader([image_batch(1)["image"][0]] * 2, batch_size=2, collate_fn=lambda x: {
        "image": torch.stack(x)})
    fit = pl.Trainer(accelerator="cpu", plugins=[fp16], max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="16-mixed.*bf16-mixed"):
        fit.fit(build_module(), train_dataloaders=data)


# ------------------------------------------------------------------------------------------- stage 2
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ldm")
    images, captions = make_images(root / "images")
    return make_cache(make_stage1_run(root / "stage1"), images, captions, root / "cache")


def test_stage2_ema_once_per_optimizer_step_in_every_checkpoint(cache, tmp_path):
    """A checkpoint saved at a step already holds that step's EMA update, so resuming from it is exact."""
    model, data = build(stage2_config(cache, "class"))
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    pl.Trainer(max_steps=STEPS, accumulate_grad_batches=2, accelerator="cpu", logger=False, callbacks=[every_step],
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               default_root_dir=str(tmp_path)).fit(model, datamodule=data)
    assert model.global_step == int(model.ema.num_updates) == STEPS
    ckpts = step_checkpoints(tmp_path / "ckpts")
    assert sorted(ckpts) == list(range(1, STEPS + 1))
    for step, ckpt in ckpts.items():
        assert int(ckpt["state_dict"]["ema.num_updates"]) == step


def stage2_weights(cache: Path, tmp_path: Path, seed: int, noise_seed: int) -> dict[str, torch.Tensor]:
    """UNet weights after 2 steps from the same initial weights, with ``-s seed`` (what the CLI does with it)."""
    model, data = build(stage2_config(cache, "class", noise_seed=noise_seed))  # same init whatever the seed
    pl.seed_everything(seed)
    trainer(tmp_path / f"{seed}_{noise_seed}", 2).fit(model, datamodule=data)
    return model.unet.state_dict()


def test_stage2_training_noise_follows_the_run_seed(cache, tmp_path):
    reference = stage2_weights(cache, tmp_path / "a", seed=1, noise_seed=0)
    same = stage2_weights(cache, tmp_path / "b", seed=1, noise_seed=0)
    other_seed = stage2_weights(cache, tmp_path / "c", seed=2, noise_seed=0)
    other_noise_seed = stage2_weights(cache, tmp_path / "d", seed=1, noise_seed=1)
    assert all(torch.equal(same[k], v) for k, v in reference.items())
    for other in (other_seed, other_noise_seed):
        assert not all(torch.equal(other[k], v) for k, v in reference.items())

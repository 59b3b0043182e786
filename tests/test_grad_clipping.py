"""Gradient clipping with the fused Adam/AdamW both stages build, under every precision.

Lightning's own clipping refuses fused optimizers under any mixed precision ("does not allow for gradient clipping
because it performs unscaling of gradients internally"), so the full-size configs (bf16-mixed + gradient_clip_val)
crashed at their first step. Reference: the gradient norm each optimizer step sees is at most the clip value, and
without clipping the same run's norm is far above it (so the test would notice clipping that did nothing).
"""
from __future__ import annotations

import pytest
from helpers import build, stage2_config, train, trainer
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.optim.optimizer import register_optimizer_step_post_hook


CLIP = 1e-3


PRECISIONS = ["32-true", "bf16-mixed", "16-mixed+scaler"]


def precision_settings(precision: str) -> dict:
    """Trainer arguments. ``16-mixed+scaler``: fp16 autocast with torch's GradScaler on CPU, given as a plugin because
    Lightning maps ``precision="16-mixed"`` to bf16 on CPU, which would leave the scaler path untested here."""
    if precision == "16-mixed+scaler":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


@pytest.fixture
def step_norms():
    """The global gradient norm each ``optimizer.step()`` used (read after the step: under automatic optimization
    Lightning's closure computes the gradients inside ``step()``; they are zeroed only later)."""
    norms: list[tuple[torch.optim.Optimizer, float]] = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad.detach().float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append((optimizer, float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))))

    handle = register_optimizer_step_post_hook(hook)
    yield norms
    handle.remove()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_stage2_clips_with_fused_adamw(setup, tmp_path, step_norms, precision):
    model, data = build(stage2_config(setup["cache"], "class"))
    run = trainer(tmp_path, 2, gradient_clip_val=CLIP, **precision_settings(precision))
    run.fit(model, datamodule=data)
    scaler = getattr(run.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed+scaler")
    assert model.trainer.optimizers[0].defaults["fused"]
    assert model.global_step == 2
    assert len(step_norms) == 2 and all(norm <= CLIP * 1.001 for _, norm in step_norms), step_norms

    step_norms.clear()
    model, data = build(stage2_config(setup["cache"], "class"))
    trainer(tmp_path / "unclipped", 1, **precision_settings(precision)).fit(model, datamodule=data)
    assert step_norms and step_norms[0][1] > 100 * CLIP


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # stage 1 refuses fp16's grad scaler
def test_stage1_grad_clip_with_fused_adam(tmp_path, step_norms, precision):
    train(tmp_path, f"lightning.trainer.precision={precision}", f"model.params.grad_clip={CLIP}",
          "model.params.loss.params.disc_start=0", "lightning.trainer.max_steps=2")
    ae = [norm for opt, norm in step_norms if opt.defaults.get("fused") and len(opt.param_groups[0]["params"]) > 100]
    assert len(step_norms) == 4 and len(ae) == 2  # autoencoder and discriminator, 2 steps each
    assert all(norm <= CLIP * 1.001 for _, norm in step_norms), step_norms

"""Encoder distillation: the student learns the teacher's posterior, decodes through the teacher's frozen
decoder, and the distilled run / export is a first stage like any other (its teacher's files not needed)."""
from __future__ import annotations

import torch

from conftest import command_module
from conftest import STAGE1_TEST_OVERRIDES
from helpers import csv_rows
from ldm import cli
from ldm.checkpoints import load_first_stage

STEPS = 30


def test_distillation_learns_the_teachers_latents_and_exports_a_standalone_first_stage(run_dir, tmp_path):
    teacher, _ = load_first_stage(run_dir)
    overrides = [o for o in STAGE1_TEST_OVERRIDES if not o.startswith("model.")]
    assert cli.main(["--base", "configs/autoencoder/distill_tiny.yaml", "-t", "-l", str(tmp_path / "logs"),
                     *overrides, f"teacher={run_dir}", f"lightning.trainer.max_steps={STEPS}",
                     "lightning.trainer.val_check_interval=15", "data.params.batch_size=8"]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    rows = csv_rows(run)
    losses = [float(r["train/mean"]) for r in rows if r.get("train/mean")]
    assert losses[-1] < 0.5 * losses[0]  # the student moves toward the teacher's means
    val = [r for r in rows if r.get("val/latent_error")]
    assert len(val) == 2 and float(val[-1]["val/latent_error"]) < float(val[0]["val/latent_error"])

    student, info = load_first_stage(run)
    assert info["config"]["target"] == "autoencoder.distillation.DistilledAutoencoder"
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():  # the teacher's decoder, unchanged by training
        assert torch.allclose(student.decode(z), teacher.decode(z), atol=1e-6)
    # The export rebuilds the teacher's decoder from its recorded config: no teacher files needed to load it.
    out = tmp_path / "release" / "student"
    assert command_module("export").main([str(run), "--out", str(out)]) == 0
    exported, _ = load_first_stage(out.with_suffix(".safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(exported.encode(x).mode(), student.encode(x).mode(), atol=1e-6)
        assert torch.allclose(exported.decode(z), teacher.decode(z), atol=1e-6)

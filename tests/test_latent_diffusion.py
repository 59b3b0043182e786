"""Stage-2 LightningModule: one optimizer step per conditioning mode (checked against Adam's closed-form first
step and the EMA formula), cached vs live-encoded batches, exact resume through the CLI, two-process DDP.

The helpers (tiny images, a random stage-1 run folder, its latent cache, a stage-2 config) are in tests/helpers.py.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, subprocess_env
from ldm import cli
from ldm.cache.reader import LatentShards
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.util import instantiate_from_config
from helpers import (CLASSES, LR, SIZE, build, image_dataset, load_ckpt, perturb, run_folder, stage2_config,
                     trainer, write_config)


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("conditioning", ["none", "class", "text"])
def test_one_training_step_per_conditioning(setup, tmp_path, conditioning):
    model, data = build(stage2_config(setup["cache"], conditioning))
    perturb(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainer(tmp_path, 1).fit(model, datamodule=data)
    assert model.global_step == 1 and int(model.ema.num_updates) == 1
    assert torch.isfinite(trainer_metric := model.trainer.callback_metrics["train/loss"]) and trainer_metric > 0

    after = model.unet.state_dict()
    # Adam's first step moves every weight by lr·g/(|g|+eps), i.e. by exactly lr where the gradient is not tiny.
    for name in after:
        step = (after[name] - before[name]).abs()
        assert (step <= LR * (1 + 1e-4)).all(), name
    moved = {k: (after[k] - before[k]).abs() > 0.99 * LR for k in after}
    total = sum(m.sum().item() for m in moved.values()) / sum(m.numel() for m in moved.values())
    assert total > 0.9  # (conv biases right before a per-channel GroupNorm get no gradient: they cancel)
    assert all(moved[k].float().mean() > 0.95 for k in after if k.startswith("time_embed"))  # t reaches the loss
    if conditioning == "class":  # the batch's labels (or the null label) reach the loss, no other
        first = {s["cls"] for s in list(LatentShards.from_cache(str(setup["cache"]), shuffle=0))[:4]}
        rows = (after["label_emb.weight"] - before["label_emb.weight"]).abs()
        assert all(rows[c].gt(0.99 * LR).all() for c in first)
        assert all(rows[c].eq(0).all() for c in set(range(len(CLASSES))) - first)
    if conditioning == "text":  # cross-attention keys see only the text context
        keys = [k for k in after if "attn2.to_k" in k]
        assert keys and all(moved[k].float().mean() > 0.9 for k in keys)
    # EMA after one update with warm-up: decay = min(0.999, 1/10), so ema = 0.1·before + 0.9·after.
    for name, value in model.ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.1 * before[name] + 0.9 * after[name], rtol=1e-5, atol=1e-6)
    # Frozen helpers never enter the checkpoint; the normalisation and latent shape do.
    keys = model.state_dict().keys()
    assert not any(k.startswith(("first_stage", "_frozen", "text", "conditioning")) for k in keys)
    assert {"scale_factor", "shift", "latent_shape"} <= set(keys)
    assert model.latent_shape.tolist() == [4, SIZE // 8, SIZE // 8]


def test_ema_once_per_optimizer_step_with_accumulation(setup, tmp_path):
    model, data = build(stage2_config(setup["cache"], "class"))
    trainer(tmp_path, 2, accumulate_grad_batches=2).fit(model, datamodule=data)
    assert model.global_step == 2 and int(model.ema.num_updates) == 2  # 4 micro-batches, 2 optimizer steps


def test_cached_and_live_batches_equal(setup):
    cached, _ = build(stage2_config(setup["cache"], "class"))
    live, _ = build(stage2_config(setup["cache"], "class", input="live",
                                  first_stage={"path": str(setup["stage1"])}))
    stats = json.loads((setup["cache"] / "manifest.json").read_text())["splits"]["train"]["stats"]
    assert float(live.scale_factor) == pytest.approx(stats["scale_factor"])

    latents = list(LatentShards.from_cache(str(setup["cache"]), sample=False, flip=False, shuffle=0))
    images = image_dataset(setup["images"], setup["captions"])
    by_key = {images.files[i]: images[i] for i in range(len(images))}
    collate = torch.utils.data.default_collate
    z_cached, cond_cached = cached.get_input(collate(latents))
    z_live, cond_live = live.get_input(collate([by_key[s["key"]] for s in latents]))
    # The cache stores fp16 posterior means: |error| <= ~1e-3 relative before normalisation.
    scale = stats["scale_factor"]
    torch.testing.assert_close(z_live, z_cached, rtol=2e-3, atol=2e-3 * scale)
    assert torch.equal(cond_live["y"], cond_cached["y"])
    assert cond_cached["y"].tolist() == [CLASSES.index(s["key"].split("/")[0]) for s in latents]
    # The reference normalisation: (mean - shift) * scale_factor of a fresh encoding.
    with torch.no_grad():
        mean = live.first_stage.encode(collate([by_key[s["key"]] for s in latents])["image"]).mean
    torch.testing.assert_close(z_live, (mean - stats["shift"]) * scale)


def test_live_mode_needs_statistics(setup):
    config = stage2_config(setup["cache"], "class", input="live", first_stage={"path": str(setup["stage1"])},
                           latent_stats=None)
    with pytest.raises(ValueError, match="latent_stats"):
        instantiate_from_config(config["model"])


def _cli(argv: list[str], monkeypatch) -> None:
    monkeypatch.delenv("LITEVAE_RUN_TIME", raising=False)
    assert cli.main(argv) == 0


def test_resume_continues_exactly(setup, tmp_path, monkeypatch):
    """2 steps + resume to 4 == 4 uninterrupted steps (same data order, training noise seeded by step).
    Tolerance: bit-exact is expected on CPU; 1e-6 allows for a different summation order."""
    base = write_config(stage2_config(setup["cache"], "class"), tmp_path / "ldm.yaml")
    _cli(["--base", base, "-t", "-l", str(tmp_path / "straight"), "lightning.trainer.max_steps=4"], monkeypatch)
    _cli(["--base", base, "-t", "-l", str(tmp_path / "split"), "lightning.trainer.max_steps=2"], monkeypatch)
    split_run = run_folder(tmp_path / "split")
    assert load_ckpt(split_run / "checkpoints" / "last.ckpt")["global_step"] == 2
    _cli(["-t", "-r", str(split_run), "lightning.trainer.max_steps=4"], monkeypatch)

    straight = load_ckpt(run_folder(tmp_path / "straight") / "checkpoints" / "last.ckpt")
    resumed = load_ckpt(split_run / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 4
    assert int(resumed["state_dict"]["ema.num_updates"]) == 4
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    # Validation ran with both weight sets, and sample grids were decoded by the first stage.
    rows = list(csv.DictReader(open(split_run / "csv" / "metrics.csv")))
    assert any(r.get("val/loss_ema") for r in rows) and any(r.get("val/loss") for r in rows)
    grids = list((split_run / "images" / "val").glob("samples_gs-*.png"))
    assert grids and Image.open(grids[0]).size[0] > 2 * SIZE


def test_init_from_keeps_this_runs_normalisation(setup, tmp_path, monkeypatch):
    """--init-from loads the UNet (and EMA) weights but not the old run's latent normalisation buffers."""
    base = write_config(stage2_config(setup["cache"], "class"), tmp_path / "ldm.yaml")
    _cli(["--base", base, "-t", "-l", str(tmp_path / "first"), "lightning.trainer.max_steps=1"], monkeypatch)
    ckpt_path = run_folder(tmp_path / "first") / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(ckpt_path)
    ckpt["state_dict"]["scale_factor"] = torch.tensor(123.0)  # as if trained on another cache
    ckpt["state_dict"]["shift"] = torch.tensor([9.0])
    torch.save(ckpt, ckpt_path)
    _cli(["--base", base, "-t", "-l", str(tmp_path / "second"), "--init-from", str(ckpt_path),
          "lightning.trainer.max_steps=1"], monkeypatch)
    second = load_ckpt(run_folder(tmp_path / "second") / "checkpoints" / "last.ckpt")["state_dict"]
    stats = json.loads((setup["cache"] / "manifest.json").read_text())["splits"]["train"]["stats"]
    assert second["scale_factor"].item() == pytest.approx(stats["scale_factor"])
    assert second["shift"].tolist() == pytest.approx(np.atleast_1d(stats["shift"]).tolist())
    # The learned weights did come from the checkpoint: one step of Adam moves each by at most lr.
    for key, value in ckpt["state_dict"].items():
        if key.startswith("unet.") and value.is_floating_point():
            assert (second[key] - value).abs().max() <= LR * (1 + 1e-4), key


@pytest.mark.slow
def test_two_process_ddp_cpu(setup, tmp_path):
    base = write_config(stage2_config(setup["cache"], "class"), tmp_path / "ldm.yaml")
    out = subprocess.run(
        [sys.executable, "main.py", "--base", base, "-t", "-l", str(tmp_path / "logs"),
         "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp", "lightning.trainer.max_steps=2"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = load_ckpt(run_folder(tmp_path / "logs") / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and int(ckpt["state_dict"]["ema.num_updates"]) == 2
    assert "GLOBAL_RANK: 1" in out.stderr or "distributed_backend=gloo" in out.stderr


def test_first_stage_changed_since_caching_is_refused(setup, tmp_path):
    """from_manifest must decode with the checkpoint that made the cache, not whatever is there now."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        entry["autoencoder"]["sha256"] = "0" * 64  # as if stage 1 had been trained further after caching
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cached with 000000000000"):
        instantiate_from_config(stage2_config(cache, "class")["model"])


def test_factory_reads_the_manifest_once_and_init_takes_values(setup, monkeypatch):
    """``instantiate_from_config`` goes through ``LatentDiffusion.from_params``, which reads the manifest once;
    ``__init__`` reads no file: the same model from values alone."""
    import ldm.models.latent_diffusion as module

    reads = []
    read = module.read_latent_stats
    monkeypatch.setattr(module, "read_latent_stats", lambda path: reads.append(path) or read(path))
    config = stage2_config(setup["cache"], "class")["model"]
    built = instantiate_from_config(config)
    assert len(reads) == 1 and built.first_stage_identity["sha256"] == read(setup["cache"])["autoencoder"]["sha256"]
    params = {k: v for k, v in config["params"].items() if k not in ("latent_stats", "first_stage")}
    by_value = LatentDiffusion(**params, scale_factor=float(built.scale_factor), shift=built.shift.tolist(),
                               latent_shape=built.latent_shape.tolist())
    assert len(reads) == 1 and by_value.first_stage is None and by_value.first_stage_identity is None
    assert by_value.KEEP_ON_INIT_FROM == built.KEEP_ON_INIT_FROM == ("scale_factor", "shift", "latent_shape")
    with pytest.raises(TypeError, match="from_params"):
        LatentDiffusion(**params, first_stage={"path": "from_manifest"})

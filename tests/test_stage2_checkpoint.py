"""A stage-2 checkpoint describes itself: it records its first stage (config, checkpoint, SHA-256, weights) next
to the normalisation, so sampling needs no latent cache; the first stage sample.py decodes with is always checked
against that record (run, --first-stage, export); --no-ema on an export is refused; checkpoints made before the
record existed still load where their cache is, or say how to proceed."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import command_module
from ldm import cli
from ldm.checkpoints import export_diffusion, export_first_stage, load_diffusion
from ldm.util import sha256_file
from helpers import make_cache, make_images, make_stage1_run, run_folder, stage2_config, write_config

SEEDS = ["--seeds", "0-1", "--steps", "2", "--device", "cpu", "--batch", "2"]


def sample_main(*argv: str) -> int:
    return command_module("sample").main([str(a) for a in argv] + SEEDS)


def refusal(*argv: str) -> str:
    """The message sample.py exits with."""
    with pytest.raises(SystemExit) as err:
        sample_main(*argv)
    return str(err.value)


@contextlib.contextmanager
def moved(path: Path):
    """``path`` out of reach for the block (a sampling machine without the latent cache), then back."""
    away = path.with_name(path.name + ".away")
    path.rename(away)
    try:
        yield
    finally:
        away.rename(path)


def perturb_checkpoint(ckpt: Path) -> None:
    """As if the stage-1 run had trained on: one weight moves, so the file's SHA-256 changes."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 0.01
    torch.save(checkpoint, ckpt)


@contextlib.contextmanager
def trained_on(ckpt: Path):
    original = ckpt.read_bytes()
    perturb_checkpoint(ckpt)
    try:
        yield sha256_file(ckpt)
    finally:
        ckpt.write_bytes(original)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A stage-1 run, its latent cache, a 2-step stage-2 run on it, and another stage-1 run (other weights)."""
    root = tmp_path_factory.mktemp("stage2ckpt")
    images, captions = make_images(root / "images")
    stage1 = make_stage1_run(root / "stage1")
    cache = make_cache(stage1, images, captions, root / "cache")
    other = Path(shutil.copytree(stage1, root / "other_stage1"))
    perturb_checkpoint(other / "checkpoints" / "last.ckpt")
    base = write_config(stage2_config(cache, "class"), root / "ldm.yaml")
    mp = pytest.MonkeyPatch()
    mp.delenv("LITEVAE_RUN_TIME", raising=False)
    assert cli.main(["--base", base, "-t", "-l", str(root / "logs"), "lightning.trainer.limit_val_batches=0"]) == 0
    mp.undo()
    return {"root": root, "stage1": stage1, "cache": cache, "other": other, "run": run_folder(root / "logs")}


def stage1_sha(env) -> str:
    return sha256_file(env["stage1"] / "checkpoints" / "last.ckpt")


def test_checkpoint_records_its_first_stage(env):
    ckpt = torch.load(env["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    identity = ckpt["first_stage"]
    assert identity["sha256"] == stage1_sha(env) and identity["weights"] == "raw"
    assert Path(identity["ckpt_path"]) == (env["stage1"] / "checkpoints" / "last.ckpt").resolve()
    assert identity["config"]["target"].startswith("autoencoder.")


def test_samples_without_the_latent_cache(env, tmp_path):
    """The run and its export sample the same images with the cache folder gone."""
    assert sample_main(env["run"], "--out", tmp_path / "with") == 0
    with moved(env["cache"]):
        assert sample_main(env["run"], "--out", tmp_path / "without") == 0
        export, _ = export_diffusion(env["run"], tmp_path / "rel" / "ldm")
        assert sample_main(export, "--out", tmp_path / "export") == 0
    reference = np.load(tmp_path / "with" / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(np.load(tmp_path / "without" / "samples.npz")["arr_0"], reference)
    with safe_open(str(export), framework="pt") as f:
        assert json.loads(f.metadata()["first_stage"])["sha256"] == stage1_sha(env)


def test_changed_first_stage_is_refused(env, tmp_path, caplog):
    """The recorded checkpoint path now holds other weights (stage 1 trained on after caching): refused,
    naming both hashes, unless --allow-first-stage-mismatch (then a warning)."""
    recorded = stage1_sha(env)
    with trained_on(env["stage1"] / "checkpoints" / "last.ckpt") as now:
        message = refusal(env["run"], "--out", tmp_path / "refused")
        assert recorded in message and now in message and "--allow-first-stage-mismatch" in message
        with caplog.at_level(logging.WARNING):
            assert sample_main(env["run"], "--out", tmp_path / "allowed", "--allow-first-stage-mismatch") == 0
        assert any("decoding anyway" in r.getMessage() for r in caplog.records)


def test_first_stage_flag_is_checked(env, tmp_path):
    """--first-stage must be the recorded first stage, for a run and for an export; the stage-1 export of the
    recorded checkpoint is (docs/stage2.md, "Release format (export)": sample.py release/ldm.safetensors --first-stage release/litevae.safetensors)."""
    other, recorded = sha256_file(env["other"] / "checkpoints" / "last.ckpt"), stage1_sha(env)
    export, _ = export_diffusion(env["run"], tmp_path / "rel" / "ldm")
    for source in (env["run"], export):
        message = refusal(source, "--out", tmp_path / "x", "--first-stage", env["other"])
        assert recorded in message and other in message
    stage1_export, _ = export_first_stage(env["stage1"], tmp_path / "rel" / "litevae")
    assert sample_main(export, "--out", tmp_path / "ok", "--first-stage", stage1_export) == 0


def test_recorded_first_stage_elsewhere_says_how(env, tmp_path):
    """On a machine without the recorded stage-1 checkpoint: an error naming it, and --first-stage works."""
    stage1_export, _ = export_first_stage(env["stage1"], tmp_path / "rel" / "litevae")
    with moved(env["stage1"]):
        assert "--first-stage" in refusal(env["run"], "--out", tmp_path / "x")
        assert sample_main(env["run"], "--out", tmp_path / "ok", "--first-stage", stage1_export) == 0


def test_no_ema_on_an_export_is_refused(env, tmp_path):
    export, _ = export_diffusion(env["run"], tmp_path / "rel" / "ldm")
    assert "--no-ema" in refusal(export, "--out", tmp_path / "x", "--no-ema")


def test_old_checkpoint_loads_with_its_cache_or_says_how(env, tmp_path):
    """A checkpoint without the record (made before it existed) loads through its cache's manifest; without the
    cache the error says what to pass; exporting it where the cache is writes a self-describing copy."""
    old = Path(shutil.copytree(env["run"], tmp_path / "old_run", ignore=shutil.ignore_patterns("samples")))
    ckpt = torch.load(old / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["first_stage"]
    torch.save(ckpt, old / "checkpoints" / "last.ckpt")
    module, _ = load_diffusion(old)
    assert module.first_stage is not None and module.first_stage_identity["sha256"] == stage1_sha(env)
    converted, _ = export_diffusion(old, tmp_path / "rel" / "converted")
    with moved(env["cache"]):
        message = refusal(old, "--out", tmp_path / "x")
        assert "--first-stage" in message and "scripts/export.py" in message
        assert sample_main(old, "--out", tmp_path / "flag", "--first-stage", env["stage1"]) == 0
        assert sample_main(converted, "--out", tmp_path / "converted") == 0

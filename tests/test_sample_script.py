"""scripts/sample.py: the same images (up to float rounding) for --batch 1 and --batch 8 and for one vs two torchrun processes; PNG folder,
samples.npz (arr_0 uint8 NHWC + labels) and grid agree with each other; the class per seed is as documented."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, command_module, subprocess_env
from ldm import cli
from ldm.checkpoints import load_diffusion
from ldm.generate import parse_seeds
from ldm.util import image_grid
from helpers import SIZE, make_cache, make_images, make_stage1_run, run_folder, stage2_config, write_config

SCRIPT = ROOT / "scripts" / "sample.py"
COMMON = ["--seeds", "0-7", "--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A stage-2 run folder: 2 training steps of the tiny class-conditional LDM through the CLI."""
    root = tmp_path_factory.mktemp("sample")
    images, captions = make_images(root / "images")
    cache = make_cache(make_stage1_run(root / "stage1"), images, captions, root / "cache")
    base = write_config(stage2_config(cache, "class"), root / "ldm.yaml")
    mp = pytest.MonkeyPatch()
    mp.delenv("LITEVAE_RUN_TIME", raising=False)
    assert cli.main(["--base", base, "-t", "-l", str(root / "logs"), "lightning.trainer.limit_val_batches=0"]) == 0
    mp.undo()
    return run_folder(root / "logs")


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to rounding: each sample's noise depends only on its seed (exact), but CPU conv kernels
    (oneDNN) sum in a batch-size-dependent order, so a value within ~1e-6 of a .5 boundary may round the other
    way: allow a difference of 1 level in at most 0.1% of the values."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


def sample(run: Path, out: Path, *args: str) -> dict:
    assert command_module("sample").main([str(run), "--out", str(out), *COMMON, *args]) == 0
    return dict(np.load(out / "samples.npz"))


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    with pytest.raises(ValueError):
        parse_seeds("5-2")


def test_batch_size_does_not_change_samples(run, tmp_path):
    one = sample(run, tmp_path / "b1", "--batch", "1")
    eight = sample(run, tmp_path / "b8", "--batch", "8")
    assert one["arr_0"].dtype == np.uint8 and one["arr_0"].shape == (8, SIZE, SIZE, 3)
    assert_same_images(one["arr_0"], eight["arr_0"])
    assert one["labels"].tolist() == [s % 2 for s in range(8)] and one["seeds"].tolist() == list(range(8))
    assert len({a.tobytes() for a in one["arr_0"]}) == 8  # different seeds, different images
    # The PNG folder and the grid hold the same pixels as the npz.
    for seed, image in zip(range(8), one["arr_0"]):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b1" / "images" / f"{seed:06d}.png")), image)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b1" / "grid.png")), image_grid(one["arr_0"][:64]))


def test_samples_match_the_library_and_class_flag(run, tmp_path):
    """The script's images are the first stage's decoding of the EMA model's per-seed DDIM latents."""
    module, _ = load_diffusion(run)
    with torch.no_grad():
        z = module.sample_latents([3, 5], labels=[1, 1], steps=4)
        ref = module.decode(z).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = sample(run, tmp_path / "c", "--batch", "3", "--class", "1")
    assert out["labels"].tolist() == [1] * 8
    assert_same_images(out["arr_0"][[3, 5]], ref)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run, tmp_path):
    single = sample(run, tmp_path / "single", "--batch", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(run), "--out", str(tmp_path / "ddp"), *COMMON, "--batch", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = dict(np.load(tmp_path / "ddp" / "samples.npz"))
    assert_same_images(ddp["arr_0"], single["arr_0"])
    np.testing.assert_array_equal(ddp["labels"], single["labels"])


@pytest.mark.slow
def test_torchrun_refuses_a_foreign_folder_on_every_rank_before_any_writes(run, tmp_path):
    """Rank 0 checks the folder; the other ranks used to start sampling regardless and write into the folder
    rank 0 refused (and, in a fresh folder, their first PNG could make rank 0 refuse its own folder)."""
    images = tmp_path / "foreign" / "images"
    images.mkdir(parents=True)
    (images / "000000.png").write_bytes(b"not ours")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(run), "--out", str(tmp_path / "foreign"), *COMMON, "--batch", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "already holds samples" in proc.stderr
    assert [p.name for p in images.iterdir()] == ["000000.png"]  # nothing written by any rank


def test_stage2_export_samples_like_the_run(run, tmp_path):
    """scripts/export.py on a stage-2 run: EMA UNet + normalisation as .safetensors + sidecar, sampled exactly
    like the run's EMA weights, and without the EMA copy (smaller)."""
    out = subprocess.run([sys.executable, "scripts/export.py", str(run), "--out", str(tmp_path / "rel" / "ldm")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    export = tmp_path / "rel" / "ldm.safetensors"
    keys = load_file(str(export)).keys()
    assert not any(k.startswith("ema.") for k in keys) and {"scale_factor", "shift", "latent_shape"} <= set(keys)
    assert export.stat().st_size < 0.6 * (run / "checkpoints" / "last.ckpt").stat().st_size
    exported, _ = load_diffusion(export)
    original, _ = load_diffusion(run, use_ema=True)
    assert exported.ema is None
    for key, value in original.ema.module.state_dict().items():
        assert torch.equal(exported.unet.state_dict()[key], value), key
    torch.testing.assert_close(exported.sample_latents([0, 1, 2], labels=[0, 1, 0], steps=3),
                               original.sample_latents([0, 1, 2], labels=[0, 1, 0], steps=3))
    assert sample(export, tmp_path / "s")["arr_0"].shape[0] == 8  # the script reads the export too


def test_dpm_solver_sampler_through_the_script(run, tmp_path):
    out = sample(run, tmp_path / "dpm", "--sampler", "dpmpp2m", "--class", "0")
    assert out["arr_0"].shape == (8, SIZE, SIZE, 3) and out["labels"].tolist() == [0] * 8
    assert len({out["arr_0"][i].tobytes() for i in range(8)}) == 8  # one distinct image per seed

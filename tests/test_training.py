"""Stage-1 training through the real CLI: steps, logging, checkpoints, kill + resume, two-process DDP."""
from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from batch_recorder import read_records, recorder_override
from conftest import LITEVAE_TINY, ROOT, SD_VAE_TINY, STAGE1_TEST_OVERRIDES, subprocess_env
from ldm import cli

LOSS_TERMS = ["loss", "rec", "lpips", "kl", "wavelet", "gauss", "g_adv", "d_loss", "logits_real", "logits_fake"]
# Mid-epoch resume runs: 32 images in batches of 4 (8 steps an epoch on one process), no random flip (it draws
# from the global RNG, which checkpoints do not hold), and nothing saved or validated but what a test asks for.
RESUME_OVERRIDES = [*STAGE1_TEST_OVERRIDES, "data.params.train.params.limit=32", "data.params.train.params.flip=false",
                    "lightning.checkpoint.every_n_train_steps=100000", "lightning.trainer.val_check_interval=100000",
                    "lightning.image_logger.every_n_steps=100000"]


def run_dir(logdir: Path) -> Path:
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def adam_steps(ckpt: dict, index: int) -> int:
    state = ckpt["optimizer_states"][index]["state"]
    return int(next(iter(state.values()))["step"])


@pytest.mark.parametrize("config", [LITEVAE_TINY, SD_VAE_TINY], ids=["litevae", "sd_vae"])
def test_few_steps_with_discriminator(tmp_path, config):
    argv = ["--base", config, "-t", "-l", str(tmp_path), *STAGE1_TEST_OVERRIDES, "lightning.trainer.max_steps=4"]
    assert cli.main(argv) == 0
    run = run_dir(tmp_path)
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4  # counts autoencoder steps only, although D stepped too
    assert adam_steps(ckpt, 0) == 4
    assert adam_steps(ckpt, 1) == 2  # discriminator active from step 2 (disc_start=2)
    assert "ema.module.decoder.conv_out.weight" in ckpt["state_dict"]
    assert not any(k.startswith("loss._lpips") for k in ckpt["state_dict"])

    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    train = [r for r in rows if r.get("train/loss")]
    for term in LOSS_TERMS:
        values = [float(r[f"train/{term}"]) for r in train if r.get(f"train/{term}")]
        assert values and all(math.isfinite(v) for v in values), term
    assert float(train[-1]["train/g_adv"]) != 0.0
    val = [r for r in rows if r.get("val/psnr")]
    assert val and all(r.get("val/psnr_ema") and r.get("val/ssim") for r in val)
    assert list((run / "images" / "val").glob("reconstructions_ema_*.png"))
    assert list((run / "configs").glob("*-project.yaml"))


def _env() -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}"  # for the batch_recorder callback
    return env


def _start(args: list[str], stderr=subprocess.PIPE, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True, **popen)


def _run(args: list[str], timeout: float) -> None:
    out = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            tail = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"training exited early ({proc.returncode}):\n{tail}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigusr1_checkpoint_then_kill_then_resume(tmp_path):
    """SIGUSR1 saves last.ckpt; after SIGKILL, -r continues step count and optimizer state."""
    logdir = tmp_path / "logs"
    proc = _start(["--base", LITEVAE_TINY, "-t", "-l", str(logdir), *STAGE1_TEST_OVERRIDES,
                   "lightning.trainer.max_steps=100000", "lightning.checkpoint.every_n_train_steps=100000",
                   "lightning.image_logger.every_n_steps=3", "lightning.trainer.val_check_interval=100000"])
    images = lambda: list(logdir.glob("*/images/train/inputs_gs-*.png"))  # noqa: E731
    _wait_for(lambda: logdir.exists() and images(), proc, timeout=240)
    last = run_dir(logdir) / "checkpoints" / "last.ckpt"
    assert not last.exists()
    proc.send_signal(signal.SIGUSR1)
    _wait_for(last.exists, proc, timeout=120)
    time.sleep(1.0)  # let the write finish (it is atomic in Lightning, but be safe)
    proc.kill()
    proc.wait()

    saved = load_ckpt(last)
    step = saved["global_step"]
    assert step >= 3
    assert adam_steps(saved, 0) == step

    out = subprocess.run([sys.executable, "main.py", "-t", "-r", str(run_dir(logdir)), *STAGE1_TEST_OVERRIDES,
                          f"lightning.trainer.max_steps={step + 2}"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = load_ckpt(last)
    assert resumed["global_step"] == step + 2
    assert adam_steps(resumed, 0) == step + 2  # optimizer state was restored, not restarted
    assert int(resumed["state_dict"]["ema.num_updates"]) == step + 2
    csv_dir = run_dir(logdir) / "csv"
    assert (csv_dir / "metrics.csv").is_file()  # the first session's log survives the resume
    assert list(csv_dir.glob("resumed_*/metrics.csv"))


def _batches(records: list[dict]) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["keys"]) for r in records]


@pytest.mark.slow
def test_sigusr1_mid_epoch_then_kill_then_resume_sees_the_uninterrupted_batches(tmp_path):
    """A pre-emption checkpoint inside an epoch, SIGKILL, then -r: the resumed run trains on the batches an
    uninterrupted run with the same seed trains on, in the same order, and ends with bitwise the same weights."""
    args = ["-t", "-s", "11", *RESUME_OVERRIDES, "lightning.trainer.max_steps=20"]  # two and a half epochs
    _run(["--base", LITEVAE_TINY, "-l", str(tmp_path / "straight"), *args, *recorder_override(tmp_path / "straight")],
         timeout=300)

    logdir = tmp_path / "killed"
    proc = _start(["--base", LITEVAE_TINY, "-l", str(logdir), *args, *recorder_override(tmp_path / "killed")])
    _wait_for(lambda: any(r["step"] >= 9 for r in read_records(tmp_path / "killed")), proc, timeout=240)
    proc.send_signal(signal.SIGUSR1)
    last = run_dir(logdir) / "checkpoints" / "last.ckpt"
    _wait_for(last.exists, proc, timeout=120)
    proc.kill()
    proc.wait()
    step = load_ckpt(last)["global_step"]
    assert 8 < step < 16  # inside the second epoch, whose order depends on the epoch

    _run(["-t", "-s", "11", "-r", str(run_dir(logdir)), *recorder_override(tmp_path / "resumed")], timeout=300)
    before = [b for b in _batches(read_records(tmp_path / "killed")) if b[0] < step]
    assert before + _batches(read_records(tmp_path / "resumed")) == _batches(read_records(tmp_path / "straight"))
    straight = load_ckpt(run_dir(tmp_path / "straight") / "checkpoints" / "last.ckpt")["state_dict"]
    resumed = load_ckpt(last)["state_dict"]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


@pytest.mark.slow
def test_ddp_sigusr1_on_one_rank_saves_on_both_then_resume_gives_each_rank_its_batches(tmp_path):
    """SIGUSR1 reaches rank 1 only: the ranks agree to save at the same step (rank 0 writes the file, so it took
    part) and training goes on. Resumed on two processes from that mid-epoch checkpoint, each rank trains on the
    batches it had after it in the first run."""
    logdir, keys = tmp_path / "logs", tmp_path / "first"
    ddp = ["lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2",
           "lightning.trainer.strategy=ddp_find_unused_parameters_true"]
    args = ["-t", *RESUME_OVERRIDES, *ddp, "data.params.train.params.limit=64"]  # 8 steps an epoch on each rank
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a pipe nobody reads could fill up and block
        proc = _start(["--base", LITEVAE_TINY, "-l", str(logdir), *args, "lightning.trainer.max_steps=100000",
                       *recorder_override(keys)], stderr=stderr, start_new_session=True)
    try:
        _wait_for(lambda: any(r["step"] >= 9 for r in read_records(keys, rank=1)), proc, timeout=300)
        os.kill(read_records(keys, rank=1)[0]["pid"], signal.SIGUSR1)
        last = run_dir(logdir) / "checkpoints" / "last.ckpt"
        _wait_for(last.exists, proc, timeout=120)
        step = load_ckpt(last)["global_step"]
        _wait_for(lambda: any(r["step"] >= step + 8 for r in read_records(keys, rank=0)), proc, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank 1 it launched
        proc.wait()
    log = (tmp_path / "stderr.txt").read_text()
    assert "rank 0: saving" in log and "rank 1: saving" in log
    assert 8 < step < 16

    _run(["-t", "-r", str(run_dir(logdir)), f"lightning.trainer.max_steps={step + 8}",
          *recorder_override(tmp_path / "resumed")], timeout=400)
    for rank in (0, 1):
        first = [b for b in _batches(read_records(keys, rank)) if step <= b[0] < step + 8]
        assert _batches(read_records(tmp_path / "resumed", rank)) == first, rank
    assert load_ckpt(last)["global_step"] == step + 8


@pytest.mark.slow
def test_two_process_ddp_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, "main.py", "--base", LITEVAE_TINY, "-t", "-l", str(tmp_path), *STAGE1_TEST_OVERRIDES,
         "lightning.trainer.max_steps=3", "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2",
         "lightning.trainer.strategy=ddp_find_unused_parameters_true", "data.params.batch_size=2"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    run = run_dir(tmp_path)  # both ranks agreed on one run folder
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert "world_size=2" in out.stderr or "GLOBAL_RANK: 1" in out.stderr or "distributed_backend=gloo" in out.stderr


@pytest.mark.slow
def test_ddp_all_bad_batch_on_one_rank_skips_the_step_everywhere(tmp_path):
    """4 images, one unreadable, batch 1 on 2 ranks: at one step one rank has no batch. Both ranks must skip
    that step together (a rank stepping alone would wait in the gradient all-reduce forever)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    config = OmegaConf.load(LITEVAE_TINY)
    config.data.params.train = config.data.params.validation = {
        "target": "ldm.data.ImageFolder", "params": {"root": str(folder), "size": 32}}
    OmegaConf.save(config, tmp_path / "stage1.yaml")
    overrides = [o for o in STAGE1_TEST_OVERRIDES if not o.startswith(("data.params.train", "data.params.val"))]
    out = subprocess.run(
        [sys.executable, "main.py", "--base", str(tmp_path / "stage1.yaml"), "-t", "-l", str(tmp_path / "logs"),
         *overrides, "data.params.batch_size=1", "lightning.trainer.max_epochs=1", "lightning.trainer.max_steps=10",
         "lightning.trainer.limit_val_batches=0", "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2",
         "lightning.trainer.strategy=ddp_find_unused_parameters_true"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = load_ckpt(run_dir(tmp_path / "logs") / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1  # 2 steps per rank in the epoch; the one with the bad image was skipped
    assert "skipped on every rank" in out.stderr


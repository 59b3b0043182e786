"""Every artifact knows what it is and proves it is whole: each fault case a new user found, as a test.

Latent caches record the first stage's weights (EMA/raw) with its SHA-256, each shard's size and hash, and are
written by one process per (split, rank); manifests are validated on read; a resumed stage-2 run refuses other
latents; sample folders record what made them; every model option checks the kind of what it is given.
Modules added for this are imported inside the tests, so that on the code before them each test fails on its own.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import command_module
from helpers import SIZE, make_cache, make_images, make_stage1_run, run_folder, stage2_config, write_config
from ldm import cli
from ldm.cache.manifest import Manifest
from ldm.util import ConfigError


# ---------------------------------------------------------------------------------------------- fixtures
def add_ema(run: Path, seed: int, scale: float = 1.0) -> Path:
    """Give a stage-1 run's checkpoint an EMA copy (other values than the raw weights), as trained runs have;
    ``scale`` multiplies every weight (another autoencoder)."""
    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(seed)
    raw = {k[len("autoencoder."):]: v * scale for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder.")}
    ckpt["state_dict"] = {**{f"autoencoder.{k}": v for k, v in raw.items()},
                          **{f"ema.module.{k}": v + 0.05 * torch.randn_like(v) for k, v in raw.items()}}
    torch.save(ckpt, path)
    return run


def train_stage2(argv: list[str]) -> int:
    mp = pytest.MonkeyPatch()
    mp.delenv("LITEVAE_RUN_TIME", raising=False)
    try:
        return cli.main([*argv, "lightning.trainer.limit_val_batches=0"])
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Images, two stage-1 runs with different weights (raw + EMA) and their caches, and a 2-step stage-2 run on
    cache A whose config reaches its cache through the top-level ``latents`` value (as the shipped configs do)."""
    root = tmp_path_factory.mktemp("artifacts")
    images, captions = make_images(root / "images")
    stage1_a = add_ema(make_stage1_run(root / "stage1_a"), seed=1)
    stage1_b = add_ema(make_stage1_run(root / "stage1_b"), seed=2, scale=1.5)
    cache_a = make_cache(stage1_a, images, captions, root / "cache_a")
    cache_b = make_cache(stage1_b, images, captions, root / "cache_b")
    config = stage2_config(cache_a, "class")
    config["latents"] = str(cache_a)
    config["model"]["params"]["latent_stats"] = "${latents}"
    for split in ("train", "validation"):
        config["data"]["params"][split]["params"]["root"] = "${latents}"
    base = write_config(config, root / "ldm.yaml")
    assert train_stage2(["--base", base, "-t", "-l", str(root / "logs")]) == 0
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"target": "ldm.data.ImageFolder", "params": {
        "root": str(images), "size": SIZE, "labels_from_subfolders": True}}))
    return {"root": root, "images": images, "stage1_a": stage1_a, "stage1_b": stage1_b, "cache_a": cache_a,
            "cache_b": cache_b, "ldm_run": run_folder(root / "logs"), "data": data}


def cache(world: dict, out: Path, *extra: str, ae: Path | None = None) -> None:
    command_module("cache_latents").main(["--ae", str(ae or world["stage1_a"]), "--data", str(world["data"]),
                                          "--out", str(out), "--samples-per-shard", "4", "--batch-size", "4",
                                          "--workers", "0", *extra])


def read_all(root: Path, split: str = "train") -> list[dict]:
    from ldm.cache import LatentShards

    return list(LatentShards.from_cache(root, split, shuffle=0, flip=False, sample=False))


# ---------------------------------------------------------------------------------------------- caches
def test_an_interrupted_cache_cannot_be_continued_with_the_other_weights(world, tmp_path, monkeypatch):
    """Before: shards 0-1 held EMA encodings, the rest raw ones, under a manifest saying "raw" (exit 0)."""
    from ldm.cache.writer import FAIL_AFTER_ENV, SimulatedCrash

    out = tmp_path / "c"
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(SimulatedCrash):
        cache(world, out)  # EMA weights, the default
    monkeypatch.delenv(FAIL_AFTER_ENV)
    with pytest.raises(SystemExit, match="ema weights of this autoencoder, but this run uses its raw weights"):
        cache(world, out, "--no-ema")
    cache(world, out)  # the same choice resumes
    assert Manifest.read(out).split("train").autoencoder["weights"] == "ema"


def test_a_second_writer_of_the_same_split_is_refused_naming_the_first(world, tmp_path):
    """Before: the second writer deleted the first's live .tar.tmp "from an interrupted run"."""
    out = tmp_path / "c"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock-train-r00").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                         "started": "2026-12-05T00:00:00", "command": "cache A"}))
        (out / "train-r00-000000.tar.tmp").write_bytes(b"the first writer's shard in progress")
        with pytest.raises(SystemExit, match=f"being written .*pid {holder.pid}.*cache A"):
            cache(world, out, "--no-ema")
        assert (out / "train-r00-000000.tar.tmp").read_bytes() == b"the first writer's shard in progress"
    finally:
        holder.kill()
        holder.wait()
    cache(world, out)  # the holder is gone: its lock is stale, taken over, and the cache is written
    assert not (out / ".lock-train-r00").exists() and Manifest.read(out).split("train").total == 16


def test_shards_of_one_split_with_different_settings_are_not_merged(world, tmp_path, monkeypatch):
    """Two ranks started at once with other weights: neither saw the other's shards when it started, so only the
    merge can see the mix (here: rank 1 written elsewhere and moved in, as a concurrent start would leave it)."""
    from ldm.cache.writer import CacheError, merge_manifest

    out, other = tmp_path / "c", tmp_path / "other"
    for name in ("RANK", "WORLD_SIZE"):  # --rank/--world-size set them for webdataset: restored after the test
        monkeypatch.setenv(name, "0" if name == "RANK" else "1")
    cache(world, out, "--rank", "0", "--world-size", "2")
    cache(world, other, "--rank", "1", "--world-size", "2", "--no-ema")
    for path in other.glob("train-r01*"):
        shutil.move(path, out / path.name)
    with pytest.raises(CacheError, match="different settings.*weights"):
        merge_manifest(out, "train", 2)


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_a_manifest_with_an_impossible_scale_factor_is_refused_on_read(world, tmp_path, value):
    """Before: 0 trained (exit 0) and sampled all-black images; NaN ended in NonFiniteLossError not naming it."""
    out = tmp_path / "c"
    shutil.copytree(world["cache_a"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["stats"]["scale_factor"] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json.*scale_factor.*finite positive"):
        read_all(out)


def test_a_truncated_or_missing_shard_is_found_at_open_and_a_rerun_repairs_it(world, tmp_path):
    """Before: a truncated shard crashed stage 2 at step 10 and a re-run of cache_latents.py kept it; a deleted
    one failed at step 4 with FileNotFoundError."""
    out = tmp_path / "c"
    cache(world, out)
    expected = {s["key"]: s["latent"] for s in read_all(out)}
    shards = sorted(out.glob("train-*.tar"))
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    shards[2].unlink()
    with pytest.raises(ValueError, match=rf"{shards[1].name} \(1000 bytes.*{shards[2].name} \(missing\)"):
        read_all(out)
    cache(world, out)
    repaired = {s["key"]: s["latent"] for s in read_all(out)}
    assert repaired.keys() == expected.keys()
    assert all(torch.allclose(repaired[k], expected[k]) for k in expected)


def test_hashes_find_a_shard_corrupted_in_place(world, tmp_path, capsys):
    """Same size, other bytes: only the SHA-256 shows it (--verify, and LatentShards(verify=True))."""
    from ldm.cache import LatentShards

    out = tmp_path / "c"
    cache(world, out)
    shard = sorted(out.glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    LatentShards.from_cache(out, "train")  # presence and size only: fast, and blind to this
    with pytest.raises(ValueError, match="SHA-256"):
        LatentShards.from_cache(out, "train", verify=True)
    with pytest.raises(SystemExit):
        command_module("cache_latents").main(["--verify", str(out)])
    assert shard.name in capsys.readouterr().out


def test_a_cache_written_before_sizes_and_hashes_were_recorded_still_loads(world, tmp_path, caplog):
    """Format 1 manifests and sidecars (no bytes/sha256, no weights in the plan): read with a warning, resumed,
    and the re-run records what was missing."""
    out = tmp_path / "c"
    shutil.copytree(world["cache_a"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = "litevae-latent-cache/1"
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            del shard["bytes"], shard["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for side in out.glob("*-r00-*.json"):
        record = json.loads(side.read_text())
        del record["bytes"], record["sha256"], record["plan"]["weights"]
        side.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        assert len(read_all(out)) == 16
    assert "records no shard sizes or hashes" in caplog.text
    command_module("cache_latents").main(["--ae", str(world["stage1_a"]), "--data", str(world["data"]), "--out",
                                          str(out), "--samples-per-shard", "6", "--batch-size", "8", "--workers",
                                          "0"])  # make_cache's settings: a resume of the finished split
    assert all(s.bytes is not None for s in Manifest.read(out).split("train").shards)


def test_shuffle_must_be_a_buffer_size(world):
    """Before: shuffle=-1 was accepted and turned shuffling off; True meant a buffer of one."""
    from ldm.cache import LatentShards
    from ldm.data import DataModule

    for bad in (-1, True):
        with pytest.raises((ValueError, TypeError), match="shuffle"):
            LatentShards.from_cache(world["cache_a"], "train", shuffle=bad)
    with pytest.raises(TypeError, match="shuffle must be true or false"):
        DataModule(batch_size=2, shuffle=-1)


# ---------------------------------------------------------------------------------------------- kinds
def test_a_stage2_model_given_where_an_autoencoder_belongs_is_named(world, tmp_path, capsys):
    """Before: missing/unexpected-key dumps or "'LatentDiffusion' object has no attribute 'encode'", and an empty
    output folder."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        cache(world, out, ae=world["ldm_run"])
    assert "is a stage-2 run (a latent diffusion model), not an autoencoder" in capsys.readouterr().err
    assert not out.exists()
    export = tmp_path / "ldm_export"
    command_module("export").main([str(world["ldm_run"]), "--out", str(export)])
    with pytest.raises(SystemExit):
        cache(world, out, ae=export.with_suffix(".safetensors"))
    assert "is a stage-2 export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command_module("sample").main([str(world["ldm_run"]), "--first-stage", str(world["ldm_run"]), "--out",
                                       str(out), "--seeds", "0-1", "--steps", "2"])
    assert "--first-stage" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        command_module("sample").main([str(world["stage1_a"]), "--out", str(out), "--seeds", "0-1"])
    assert "is a stage-1 run (an autoencoder), not a stage-2 model" in capsys.readouterr().err


def test_exports_say_what_they_are_and_are_readable_like_their_config(world, tmp_path):
    """Before: the .safetensors was written 0600 while the .yaml beside it was 0644."""
    from ldm.artifact_kinds import Kind, identify

    old = os.umask(0o022)
    try:
        command_module("export").main([str(world["stage1_a"]), "--out", str(tmp_path / "ae")])
        command_module("export").main([str(world["ldm_run"]), "--out", str(tmp_path / "ldm")])
    finally:
        os.umask(old)
    for name in ("ae", "ldm"):
        weights, sidecar = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.yaml"
        assert weights.stat().st_mode & 0o777 == sidecar.stat().st_mode & 0o777 == 0o644
    assert identify(tmp_path / "ae.safetensors") is Kind.AUTOENCODER_EXPORT
    assert identify(tmp_path / "ldm.safetensors") is Kind.DIFFUSION_EXPORT
    assert identify(world["cache_a"]) is Kind.LATENT_CACHE and identify(world["stage1_a"]) is Kind.AUTOENCODER_RUN


# ---------------------------------------------------------------------------------------------- stage 2
def test_resuming_on_another_autoencoders_latents_is_refused_unless_retargeted(world, tmp_path):
    """Before: -r <run> latents=<other cache> trained on them (exit 0) and the new last.ckpt kept the old first
    stage's SHA-256 and scale_factor."""
    run = tmp_path / "run"
    shutil.copytree(world["ldm_run"], run)
    resume = ["-r", str(run), "-t", f"latents={world['cache_b']}", "lightning.trainer.max_steps=4"]
    with pytest.raises(ConfigError, match="the latents differ from the ones this run trained on.*scale_factor"):
        train_stage2(resume)
    assert train_stage2([*resume, "model.params.retarget_latents=true"]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    stats = Manifest.read(world["cache_b"]).split("train")
    assert ckpt["first_stage"]["sha256"] == stats.autoencoder["sha256"]
    assert float(ckpt["state_dict"]["scale_factor"]) == pytest.approx(stats.scale_factor)


def test_resume_overrides_that_change_parameter_shapes_are_named(world, tmp_path):
    """Before: 644 size-mismatch lines without saying that an override differs from the saved config."""
    run = tmp_path / "run"
    shutil.copytree(world["ldm_run"], run)
    with pytest.raises(ConfigError, match=r"would change shape.*model_channels: 16 -> 32"):
        train_stage2(["-r", str(run), "-t", "model.params.unet_config.params.model_channels=32"])


def test_an_override_of_the_wrong_type_names_its_key(world):
    """Before: "not all arguments converted during string formatting" from deep inside the UNet."""
    with pytest.raises(ConfigError, match=r"channel_mult=abc.*is a list in the config"):
        train_stage2(["-r", str(world["ldm_run"]), "-t", "model.params.unet_config.params.channel_mult=abc"])


# ---------------------------------------------------------------------------------------------- samples
def sample(world: dict, out: Path, *args: str) -> int:
    return command_module("sample").main([str(world["ldm_run"]), "--out", str(out), "--steps", "2", "--device",
                                          "cpu", *args])


def test_a_sample_folder_holds_one_requests_samples(world, tmp_path):
    """Before: a second run's PNGs were added to the folder and eval_fid scored both runs' samples."""
    out = tmp_path / "s"
    assert sample(world, out, "--seeds", "0-3") == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["seeds"] == "0-3" and record["settings"]["steps"] == 2
    assert sample(world, out, "--seeds", "0-3") == 0  # the same request again (e.g. after an interruption)
    with pytest.raises(SystemExit, match="holds samples of another request.*seeds"):
        sample(world, out, "--seeds", "4-7")
    with pytest.raises(SystemExit, match="holds samples of another request.*settings"):
        sample(world, out, "--seeds", "0-3", "--cfg", "1")
    assert len(list((out / "images").glob("*.png"))) == 4
    legacy = tmp_path / "legacy"
    (legacy / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(legacy / "images" / "000000.png")
    with pytest.raises(SystemExit, match="already holds samples .*images"):
        sample(world, legacy, "--seeds", "0-1")


def test_an_impossible_seed_request_fails_before_sampling(world, tmp_path):
    """Before: --seeds 0-999999999 was killed by the OOM killer at ~23 GB with no message."""
    from ldm.generate import parse_seeds

    seeds = parse_seeds("0-999999999")
    assert len(seeds) == 10 ** 9 and seeds[123_456_789] == 123_456_789  # nothing expanded
    with pytest.raises(ValueError, match="given twice"):
        parse_seeds("0-9,5")
    with pytest.raises(SystemExit, match="need .* GiB of memory"):
        sample(world, tmp_path / "s", "--seeds", "0-999999999")


def test_a_second_sampler_into_one_folder_is_refused(world, tmp_path):
    from ldm.locks import output_lock

    out = tmp_path / "s"
    with output_lock(out):  # held by this (live) process
        with pytest.raises(SystemExit, match="being written"):
            sample(world, out, "--seeds", "0-1")


# ---------------------------------------------------------------------------------------------- images
def test_an_image_folder_with_a_symlink_loop_lists_each_image_once(tmp_path):
    """Before: a folder of 4 images with a link to itself cached 164 samples, silently."""
    from ldm.data.images import ImageFolder

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((SIZE, SIZE, 3), i * 40, np.uint8)).save(root / "a" / f"{i}.png")
    os.symlink(root, root / "a" / "loop")
    os.symlink(root / "a" / "0.png", root / "again.png")
    os.mkfifo(root / "pipe.png")
    assert len(ImageFolder(root, size=SIZE)) == 4


def test_exports_made_before_they_recorded_their_kind_are_still_recognised_and_load(world, tmp_path):
    """Exports from before ``format``/``kind`` metadata: the kind comes from the config sidecar, and they load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ldm.artifact_kinds import Kind, identify
    from ldm.checkpoints import load_diffusion, load_first_stage, read_diffusion_checkpoint

    for run, name, kind in ((world["stage1_a"], "ae", Kind.AUTOENCODER_EXPORT),
                            (world["ldm_run"], "ldm", Kind.DIFFUSION_EXPORT)):
        command_module("export").main([str(run), "--out", str(tmp_path / name)])
        path = tmp_path / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("format", "kind")}
        save_file(load_file(str(path)), str(path), metadata=meta)  # as the old exporter wrote it
        assert identify(path) is kind
    load_first_stage(tmp_path / "ae.safetensors")
    assert read_diffusion_checkpoint(tmp_path / "ldm.safetensors")[1]["first_stage"]
    load_diffusion(tmp_path / "ldm.safetensors", first_stage=str(tmp_path / "ae.safetensors"))

"""diffusers autoencoder folders (AutoencoderKL of any latent width, AutoencoderDC, AutoencoderTiny) as first stages,
through ``ldm.checkpoints.load_first_stage``: the adapter's API and identity, cache_latents.py and
eval_autoencoder.py on each class, cache -> stage 2 -> sample.py on a KL model, our SD-VAE and a diffusers
AutoencoderKL converted from its weights giving the same latents, and the comparison's arm taking a folder as is.

Every model is tiny and random, written with ``save_pretrained`` into a temporary folder: nothing downloads.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

# diffusers is an optional dependency of the project, installed for the tests by requirements-dev.txt.
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderTiny
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from conftest import command_module
from ldm import cli
from ldm.checkpoints import export_first_stage, first_stage_identity, first_stage_mismatch, load_first_stage
from ldm.cache.manifest import Manifest
from ldm.first_stage import DiffusersAutoencoder
from lab import compare
from lab.compare import Arm, CompareOptions
from lab.pipeline import Pipeline
from ldm.util import instantiate_from_config, sha256_file
from helpers import FakeCommands, SIZE, fake_measure, make_images, quiet, run_folder, stage2_config, write_config

WEIGHTS = "diffusion_pytorch_model.safetensors"
KL_CHANNELS = 8  # not SD's 4: any latent width goes through


def tiny_kl() -> AutoencoderKL:
    """Factor 4, FLUX-like scaling and shift in the config."""
    return AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=KL_CHANNELS,
                         norm_num_groups=4, sample_size=SIZE, scaling_factor=0.5, shift_factor=0.1)


def tiny_dc() -> AutoencoderDC:
    return AutoencoderDC(latent_channels=16, attention_head_dim=8, encoder_block_types="ResBlock",
                         decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8, 16),
                         decoder_block_out_channels=(8, 8, 16), encoder_layers_per_block=(1, 1, 1),
                         decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((),) * 3,
                         decoder_qkv_multiscales=((),) * 3, scaling_factor=0.4)


def tiny_taesd() -> AutoencoderTiny:
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)


BUILDERS = {"kl": tiny_kl, "dc": tiny_dc, "tiny": tiny_taesd}


@pytest.fixture(autouse=True)
def _rank_env(monkeypatch):
    """cache_latents.py sets RANK/WORLD_SIZE for webdataset: keep them from leaking into the next test."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LITEVAE_RUN_TIME", raising=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 random 32x32 PNGs in two class folders, and a data config for them."""
    root = tmp_path_factory.mktemp("data")
    images, _ = make_images(root / "images")
    config = {"target": "ldm.data.ImageFolder",
              "params": {"root": str(images), "size": SIZE, "labels_from_subfolders": True}}
    return Path(write_config(config, root / "data.yaml"))


def cache(folder: Path, data: Path, out: Path, split: str = "train") -> Manifest:
    command_module("cache_latents").main(["--ae", str(folder), "--data", str(data), "--split", split, "--out", str(out),
                                       "--workers", "0", "--batch-size", "8", "--device", "cpu"])
    return Manifest.read(out)


# ------------------------------------------------------------------------------------------ adapter
@pytest.mark.parametrize("name", list(BUILDERS))
def test_adapter_gives_our_api_and_identity(folders, name):
    model, info = load_first_stage(folders[name])
    vae = model.vae
    assert isinstance(model, DiffusersAutoencoder) and model.encoder is vae.encoder and model.decoder is vae.decoder
    assert info["config"]["target"] == f"diffusers.{type(vae).__name__}" and info["weights"] == "as stored"
    assert info["ckpt_path"] == str((folders[name] / WEIGHTS).resolve())
    assert info["sha256"] == sha256_file(folders[name] / WEIGHTS)
    assert info["scaling"]["scaling_factor"] == vae.config.scaling_factor
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        rec = model.decode(posterior.mode())
    assert rec.shape == x.shape and posterior.mean.shape[-1] == SIZE // model.downsample_factor
    assert posterior.logvar.shape == posterior.std.shape == posterior.mean.shape
    assert posterior.kl().shape == (2,) and torch.isfinite(posterior.logvar).all()
    sample = posterior.sample(torch.Generator().manual_seed(0))
    if name == "kl":  # a Gaussian: samples differ from the mean by std
        assert (posterior.std > 0).all() and not torch.equal(sample, posterior.mean)
    else:  # deterministic encoders: std 0, a sample is the latent
        assert (posterior.std == 0).all() and torch.equal(sample, posterior.mode()) and (posterior.kl() == 0).all()
    # The recorded identity reloads the same model, as stage 2 and sample.py do (from_manifest / checkpoint).
    again, info_again = load_first_stage(config=info["config"], ckpt=info["ckpt_path"])
    assert first_stage_mismatch(first_stage_identity(info), info_again) is None
    with torch.no_grad():
        assert torch.equal(again.encode(x).mode(), posterior.mode())


def test_a_folder_with_another_config_is_not_the_recorded_one(folders):
    _, info = load_first_stage(folders["kl"])
    other = {"target": info["config"]["target"], "params": {**info["config"]["params"], "scaling_factor": 1.0}}
    with pytest.raises(ValueError, match="not the recorded config"):
        load_first_stage(config=other, ckpt=info["ckpt_path"])


def test_a_pipeline_download_gives_its_vae(folders, tmp_path):
    shutil.copytree(folders["tiny"], tmp_path / "pipeline" / "vae")
    _, info = load_first_stage(tmp_path / "pipeline")
    assert info["sha256"] == sha256_file(folders["tiny"] / WEIGHTS)
    with pytest.raises(ValueError, match="use the folder itself"):  # no export of what is already a release
        export_first_stage(tmp_path / "pipeline", tmp_path / "export")


def test_missing_pieces_say_what_to_do(folders, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text((folders["kl"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_first_stage(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data"):  # the scripts' default data comes from a project config
        command_module("cache_latents").main(["--ae", str(folders["kl"]), "--out", str(tmp_path / "c")])
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_first_stage(folders["kl"])


# ------------------------------------------------------------------------------------------ SD-VAE
SD_TINY = dict(ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=1, z_channels=4, norm_groups=8)


def test_sd_vae_and_its_diffusers_conversion_agree(tmp_path):
    """Our SD-VAE (LDM key layout) converted with diffusers' own LDM->diffusers code: the same latents."""
    torch.manual_seed(0)
    ours = instantiate_from_config({"target": "autoencoder.model.Autoencoder", "params": {
        "z_channels": 4, "use_quant_conv": True,
        "encoder_config": {"target": "autoencoder.sd_vae.Encoder", "params": {**SD_TINY, "double_z": True}},
        "decoder_config": {"target": "autoencoder.sd_vae.Decoder", "params": SD_TINY}}}).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ours.state_dict(), vae.config), strict=True)
    vae.save_pretrained(tmp_path / "sd")
    theirs, _ = load_first_stage(tmp_path / "sd")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ours.encode(x), theirs.encode(x)
        assert (a.mean - b.mean).abs().max() <= 1e-5 and (a.std - b.std).abs().max() <= 1e-5
        assert (ours.decode(a.mean) - theirs.decode(b.mean)).abs().max() <= 1e-4  # 8 more layers and attention


# ------------------------------------------------------------------------------------------ scripts
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cache_and_eval_scripts(folders, data, tmp_path, name):
    manifest = cache(folders[name], data, tmp_path / "cache")
    entry = manifest.split("train")
    config = json.loads((folders[name] / "config.json").read_text())
    assert entry.total == 16 and entry.autoencoder["sha256"] == sha256_file(folders[name] / WEIGHTS)
    assert entry.autoencoder["scaling"]["scaling_factor"] == config["scaling_factor"]  # recorded, not used
    assert entry.latent_shape[0] == config["latent_channels"]
    report = command_module("eval_autoencoder").main([
        "--ae", str(folders[name]), "--data", str(data), "--split", "train", "--detector", "random", "--no-lpips",
        "--max-samples", "4", "--device", "cpu", "--out", str(tmp_path / "ae.json")])
    (row,) = report["results"]
    assert row["weights"] == "as stored" and row["n"] == 4 and row["psnr"] > 0
    assert report["autoencoder"]["config"]["target"] == f"diffusers.{config['_class_name']}"


def test_kl_folder_end_to_end(folders, data, tmp_path):
    """cache (both splits) -> stage 2 (first stage from the manifest) -> sample.py, with and without --first-stage."""
    latents = tmp_path / "cache"
    for split in ("train", "validation"):
        cache(folders["kl"], data, latents, split)
    config = stage2_config(latents, "class")
    config["model"]["params"]["unet_config"]["params"].update(in_channels=KL_CHANNELS, out_channels=KL_CHANNELS)
    base = write_config(config, tmp_path / "ldm.yaml")
    assert cli.main(["--base", base, "-t", "-l", str(tmp_path / "logs"), "lightning.trainer.limit_val_batches=0"]) == 0
    run = run_folder(tmp_path / "logs")
    identity = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["first_stage"]
    assert identity["config"]["target"] == "diffusers.AutoencoderKL"
    assert identity["sha256"] == sha256_file(folders["kl"] / WEIGHTS)
    sample = command_module("sample")
    common = ["--seeds", "0-1", "--steps", "2", "--device", "cpu", "--batch", "2"]
    assert sample.main([str(run), "--out", str(tmp_path / "s1"), *common]) == 0
    assert sample.main([str(run), "--out", str(tmp_path / "s2"), "--first-stage", str(folders["kl"]), *common]) == 0
    assert (tmp_path / "s1" / "grid.png").is_file()
    assert (tmp_path / "s1" / "samples.npz").read_bytes() == (tmp_path / "s2" / "samples.npz").read_bytes()


# ------------------------------------------------------------------------------------------ comparison
def test_compare_arm_uses_a_diffusers_folder_as_is(folders, tmp_path):
    arms = [Arm("lite", "LiteVAE", "configs/autoencoder/litevae_tiny.yaml", "configs/ldm/fmnist_litevae_tiny.yaml"),
            Arm("sd", "SD-VAE (diffusers)", str(folders["kl"]), "configs/ldm/fmnist_sd_vae_tiny.yaml")]
    assert [a.pretrained for a in arms] == [False, True]
    fake = FakeCommands()
    opts = CompareOptions(out_dir=str(tmp_path / "cmp"), arms=arms, ae_steps=20, ldm_steps=20, seeds="0-19",
                          detector="random", repeats=1, photos="configs/data/photos64.yaml", jobs=1)
    report = compare.run_comparison(opts, Pipeline(opts.out_dir, echo=quiet, runner=fake), measure=fake_measure)
    scripts = [Path(c[1]).name for c in fake.calls]
    # the trained arm: stage 1, 2 caches, stage 2, samples and stage-1 evaluations at 2 points each, photo stage 1
    # and its 2 evaluations; the folder's arm trains no stage 1 (Fashion-MNIST, photos) and is evaluated once
    assert scripts[11:] == ["cache_latents.py", "cache_latents.py", "main.py", "sample.py", "sample.py",
                            "eval_autoencoder.py", *["eval_fid.py"] * 4]
    for cmd in fake.calls[11:17]:
        if "--ae" in cmd:
            assert cmd[cmd.index("--ae") + 1] == str(folders["kl"])
    assert "(pretrained, used as is)" in report.read_text()
    measured = compare.measure_encoders({"sd": str(folders["kl"])}, batch_size=2, repeats=1)["sd"]
    vae = AutoencoderKL.from_pretrained(folders["kl"])
    assert measured["encoder_params"] == sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())


@pytest.mark.slow
def test_compare_encoders_runs_a_diffusers_arm_end_to_end(folders, data, tmp_path):
    """scripts/compare_encoders.py with real commands: a diffusers folder as the arm's first stage (no stage 1),
    its latents cached, an LDM trained on them, sampled, and both evaluations written into the report."""
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--data", str(data), "--arm", "kl", "tiny KL (diffusers)", str(folders["kl"]),
            "configs/ldm/fmnist_sd_vae_tiny.yaml", "--repeats", "1", "--no-photos", "--ldm-steps", "2", "--seeds", "0-7", "--sample-batch", "8",
            "--detector", "random", "--eval-samples", "8", "--ldm-overrides",
            f"model.params.unet_config.params.in_channels={KL_CHANNELS}",
            f"model.params.unet_config.params.out_channels={KL_CHANNELS}", "model.params.lr_warmup_steps=0",
            "data.params.batch_size=8", "lightning.trainer.limit_val_batches=0"]
    assert command_module("compare_encoders").main(argv) == 0
    report = (out / "report.md").read_text()
    assert "tiny KL (diffusers)" in report and "(pretrained, used as is)" in report
    assert not list((out / "runs").glob("kl_ae*"))  # no stage-1 training for a pretrained arm
    ae_eval = json.loads((out / "eval" / "kl_r0_ae.json").read_text())
    assert ae_eval["autoencoder"]["sha256"] == sha256_file(folders["kl"] / WEIGHTS)
    ldm_eval = json.loads((out / "eval" / "kl_r0_ldm.json").read_text())
    assert ldm_eval["n_samples"] == 8 and "class_accuracy" in ldm_eval

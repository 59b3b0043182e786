"""Stage 2 with either backbone (UNet | DiT) and either objective (DDPM | flow matching), through the public
commands: train on cached latents, resume exactly, export, sample with sample.py (the objective's samplers).

The flow loss and samplers themselves are checked against closed forms in tests/test_flow.py; here the point
is that the LightningModule wires them (loss, validation, EMA, resume, export, sampling) like the DDPM path.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import ROOT, command_module
from ldm import cli
from ldm.checkpoints import load_diffusion
from ldm.diffusion import TimeSampler, flow_loss
from helpers import (SIZE, build, load_ckpt, make_cache, make_images, make_stage1_run, run_folder, stage2_config,
                     write_config)

TINY_DIT = {"target": "ldm.modules.dit.DiT", "params": {
    "input_size": SIZE // 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2}}
FLOW = {"objective": "flow", "time_sampler": {"distribution": "logit_normal", "mean": 0.0, "std": 1.0}}


def config(cache, backbone: str, objective: str) -> dict:
    cfg = stage2_config(cache, "class", **(FLOW if objective == "flow" else {}))
    if backbone == "dit":
        dit = copy.deepcopy(TINY_DIT)
        dit["params"]["num_classes"] = cfg["model"]["params"]["unet_config"]["params"]["num_classes"]
        cfg["model"]["params"]["unet_config"] = dit
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    images, captions = make_images(root / "images")
    return make_cache(make_stage1_run(root / "stage1"), images, captions, root / "cache")


@pytest.fixture
def no_run_time(monkeypatch):
    monkeypatch.delenv("LITEVAE_RUN_TIME", raising=False)


def test_flow_training_step_is_the_flow_loss(cache):
    """The module's loss on a batch equals ldm.diffusion.flow_loss with the same generator (and not DDPM's)."""
    model, data = build(config(cache, "dit", "flow"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    z, cond = model.get_input(batch)
    ours, _ = model.loss(model.unet, z, cond, torch.Generator().manual_seed(3))
    direct, _ = flow_loss(model.unet, z, cond, time_sampler=TimeSampler("logit_normal"),
                          generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, direct)
    ddpm, _ = build(config(cache, "dit", "ddpm"))
    ddpm.unet.load_state_dict(model.unet.state_dict())
    other, _ = ddpm.loss(ddpm.unet, z, cond, torch.Generator().manual_seed(3))
    assert not torch.allclose(ours, other)


@pytest.mark.parametrize("backbone,objective", [("dit", "flow"), ("unet", "flow"), ("dit", "ddpm")])
def test_train_resume_export_and_sample(cache, tmp_path, no_run_time, backbone, objective):
    """2 steps + resume to 3 == 3 steps; the export samples like the run; the objective picks the samplers."""
    base = write_config(config(cache, backbone, objective), tmp_path / "ldm.yaml")
    assert cli.main(["--base", base, "-t", "-l", str(tmp_path / "straight"), "lightning.trainer.max_steps=3"]) == 0
    assert cli.main(["--base", base, "-t", "-l", str(tmp_path / "split"), "lightning.trainer.max_steps=2"]) == 0
    split = run_folder(tmp_path / "split")
    assert cli.main(["-t", "-r", str(split), "lightning.trainer.max_steps=3"]) == 0
    straight, resumed = (load_ckpt(run_folder(tmp_path / d) / "checkpoints" / "last.ckpt") for d in ("straight", "split"))
    assert resumed["global_step"] == 3 and int(resumed["state_dict"]["ema.num_updates"]) == 3
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-6, atol=1e-6, msg=key)

    model = load_diffusion(split, device="cpu")[0]
    assert model.objective.name == objective and type(model.unet).__name__ == {"dit": "DiT", "unet": "UNetModel"}[backbone]
    sample = command_module("sample")
    common = ["--seeds", "0-3", "--steps", "3", "--device", "cpu", "--batch", "2"]
    assert sample.main([str(split), "--out", str(tmp_path / "run_samples"), *common]) == 0
    assert command_module("export").main([str(split), "--out", str(tmp_path / "release" / "ldm")]) == 0
    assert sample.main([str(tmp_path / "release" / "ldm.safetensors"), "--out", str(tmp_path / "export_samples"),
                        *common]) == 0
    run_npz, export_npz = (np.load(tmp_path / d / "samples.npz") for d in ("run_samples", "export_samples"))
    assert run_npz["arr_0"].shape == (4, SIZE, SIZE, 3) and run_npz["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(run_npz["arr_0"], export_npz["arr_0"])  # the export is the run's EMA model
    samplers = ("euler", "heun", "euler_maruyama") if objective == "flow" else ("ddim", "ddpm", "dpmpp2m")
    outs = {s: model.sample_latents([0, 1], labels=[0, 1], steps=3, sampler=s) for s in samplers}
    assert all(torch.isfinite(z).all() and z.shape == (2, 4, SIZE // 8, SIZE // 8) for z in outs.values())
    assert not torch.allclose(outs[samplers[0]], outs[samplers[1]])
    wrong = "ddim" if objective == "flow" else "heun"
    with pytest.raises(ValueError, match="does not fit objective"):
        model.sample_latents([0], labels=[0], steps=2, sampler=wrong)


def test_flow_config_of_the_compare_variant_builds(cache):
    """configs/ldm/fmnist_dit_flow_tiny.yaml: a DiT trained by flow matching, the model of compare --ldm-config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "ldm" / "fmnist_dit_flow_tiny.yaml")
    cfg.latents = str(cache)
    params = OmegaConf.to_container(cfg.model.params, resolve=True)
    params["unet_config"]["params"]["input_size"] = SIZE // 8  # this cache's latents are 4x4, Fashion-MNIST's 8x8
    from ldm.models.latent_diffusion import LatentDiffusion

    model = LatentDiffusion.from_params(**params)
    assert model.objective.name == "flow" and type(model.unet).__name__ == "DiT"
    z = model.sample_latents([0, 1], labels=[3, 4], steps=2)
    assert z.shape == (2, 4, SIZE // 8, SIZE // 8) and torch.isfinite(z).all()

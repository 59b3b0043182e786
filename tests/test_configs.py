"""Every config in ``configs/`` trains as shipped: four of the six full-size stage-2 configs crashed at their
first step and no test had ever trained one.

``test_config_trains`` is parametrised over the folder, so a new config is covered without editing this file. Each
config trains for two steps through ``main.py``'s own entry point with its own trainer, optimizer, precision,
clipping, EMA, strategy, conditioning and objective, on tiny synthetic data (image folder, WebDataset shards, latent
cache of a random tiny autoencoder) or Fashion-MNIST, with only sizes shrunk: widths, depths, resolution, batch,
epoch lengths and step schedules (``shrink``). Stage-2 configs then sample and decode; stage-1 configs encode and
decode. A data config (no ``model``) trains after the tiny LiteVAE; an ablation plan trains each of its variants.

``test_true_size_parameter_counts`` builds every config's networks at their real size on the meta device (each size
preset of a config with a top-level ``size`` key) and checks the count printed in the configs tables of
docs/stage1.md and docs/stage2.md.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT
from ldm import cli
from ldm.checkpoints import load_diffusion, load_first_stage
from ldm.data.images import ImageFolder
from ldm.cache.writer import CacheOptions, cache_latents
from ldm.generate import generate
from lab.ablation import read_plan
from ldm.util import count_params, instantiate_from_config
from helpers import TINY_TEXT, make_stage1_run

SIZE = 64  # test images; the f=8 autoencoders give 8x8 latents
STEPS = 2
STAGE1_TINY = "configs/autoencoder/litevae_tiny.yaml"  # what a data config is merged after

# Widths and depths by target; every other argument stays as the config has it.
WIDTHS: dict[str, dict[str, Any]] = {
    "autoencoder.litevae_encoder.LiteVAEEncoder": {"size": None, "extractor_channels": 8, "extractor_mult": [1, 2],
                                                   "aggregator_channels": 8, "aggregator_mult": [1, 2],
                                                   "norm_groups": 4},
    "autoencoder.sd_vae.Encoder": {"ch": 8, "num_res_blocks": 1, "norm_groups": 4},  # ch_mult (the factor f) stays
    "autoencoder.sd_vae.Decoder": {"ch": 8, "num_res_blocks": 1, "norm_groups": 4},
    "autoencoder.discriminator.UNetDiscriminator": {"channels": 8},
    "ldm.modules.unet.UNetModel": {"model_channels": 16, "num_res_blocks": 1, "num_head_channels": 8},
    "ldm.modules.dit.DiT": {"hidden_size": 32, "depth": 2, "num_heads": 2, "input_size": SIZE // 8},
    "ldm.modules.conditioners.OpenCLIPTextEncoder": {**TINY_TEXT["params"], "pretrained_path": None},
}


# ----------------------------------------------------------------------------------------------- the cases
def config_cases() -> list:
    cases = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        name = path.relative_to(ROOT).as_posix()
        raw = OmegaConf.load(path)
        if "variants" in raw:  # an ablation plan: each variant is a config + overrides on the plan's data
            data, arms = read_plan(str(path))
            cases += [pytest.param([arm.ae_config, data], arm.ae_overrides, id=f"{name}::{arm.key}") for arm in arms]
        elif "model" not in raw:  # only a data section: merged after a stage-1 config, as its comment says
            cases.append(pytest.param([STAGE1_TINY, name], [], id=name))
        else:
            cases.append(pytest.param([name], [], id=name))
    return cases


def model_configs() -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "configs").rglob("*.yaml"))
            if "model" in OmegaConf.load(p)]


# ----------------------------------------------------------------------------------------------- test data
def write_images(folder: Path, n: int = 12) -> dict[str, str]:
    """``n`` random RGB PNGs (80x72, not square) in two class sub-folders; returns captions by file."""
    rng = np.random.default_rng(0)
    captions = {}
    for i in range(n):
        name = f"{'ab'[i % 2]}/img{i:02d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / name)
        captions[name] = f"a photo number {i}"
    return captions


def write_shards(folder: Path, images: Path, captions: dict[str, str]) -> str:
    """The images as two WebDataset shards with ``png``, ``cls`` and ``txt``; returns the brace pattern."""
    folder.mkdir()
    names = sorted(captions)
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for name in names[shard::2]:
                key = name.replace("/", "_").removesuffix(".png")
                fields = {"png": (images / name).read_bytes(), "cls": name[0].encode() == b"b" and b"1" or b"0",
                          "txt": captions[name].encode()}
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "{00000..00001}.tar")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("assets")
    images = root / "images"
    captions = write_images(images)
    (root / "captions.json").write_text(__import__("json").dumps(captions))
    stage1 = make_stage1_run(root / "stage1")  # a random tiny LiteVAE, f=8, 4 channels
    model, info = load_first_stage(stage1)
    dataset = ImageFolder(images, size=SIZE, labels_from_subfolders=True, captions=root / "captions.json")
    data_cfg = {"target": "ldm.data.ImageFolder", "params": {"root": str(images), "size": SIZE}}
    for split in ("train", "validation"):
        cache_latents(model, info, dataset, CacheOptions(str(root / "cache"), split, samples_per_shard=4), data_cfg)
    return {"images": str(images), "stage1": str(stage1), "cache": str(root / "cache"),
            "shards": write_shards(root / "shards", images, captions)}


# ----------------------------------------------------------------------------------------------- shrinking
def shrink(config: dict, assets: dict[str, str]) -> dict:
    """``config`` (a plain dict, interpolations unresolved) with only sizes shrunk and data pointed at ``assets``."""
    if "latents" in config:
        config["latents"] = assets["cache"]
    if "images" in config:
        config["images"] = assets["images"]
    if "teacher" in config:  # a distillation config: the tiny random LiteVAE as the teacher
        config["teacher"] = assets["stage1"]
    _shrink_node(config, assets)
    trainer = config["lightning"].setdefault("trainer", {})
    trainer.update(max_steps=STEPS, log_every_n_steps=1, enable_progress_bar=False)
    if trainer.get("limit_val_batches", 1):
        trainer["limit_val_batches"] = 1
    config["lightning"]["logger"] = {"tensorboard": None}
    return config


def _shrink_node(node: Any, assets: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _shrink_node(item, assets)
    if not isinstance(node, dict):
        return
    if "target" in node:
        params = node.setdefault("params", {})
        params.update(WIDTHS.get(node["target"], {}))
        _shrink_params(node["target"], params, assets)
    for value in node.values():
        _shrink_node(value, assets)


def _shrink_params(target: str, params: dict, assets: dict[str, str]) -> None:
    """Resolution, batch, epoch lengths and step schedules; the data pointed at tiny local copies."""
    name = target.rsplit(".", 1)[-1]
    if name == "DataModule":
        params["batch_size"] = 2
        params.pop("val_batch_size", None)
    elif name == "ImageFolder":
        params.update(root=assets["images"], size=SIZE)
    elif name == "PhotoCrops":
        params.update(root=assets["images"], size=SIZE // 2, resize=SIZE)
    elif name == "FashionMNIST":
        params.update(size=SIZE // 2, limit=16)
    elif name == "WebDatasetImages":
        params.update(urls=assets["shards"], size=SIZE)
    if name in ("LatentShards", "WebDatasetImages") and params.get("epoch_length"):
        params["epoch_length"] = 8
    if name == "AutoencoderModule" and params.get("train_crop_schedule"):  # 256-pixel configs: 128 -> 32, 256 -> 64
        params["train_crop_schedule"] = {k: v * SIZE // 256 for k, v in params["train_crop_schedule"].items()}
    if name == "AutoencoderLoss":
        params["disc_start"] = min(params.get("disc_start", 0), 1)  # the discriminator steps at step 2
        if (params.get("lpips") or {}).get("if_missing") == "error":  # no VGG16 file offline: a random trunk
            params["lpips"]["if_missing"] = "random"
    if name == "LatentDiffusion":
        if params.get("first_stage", {}).get("path") == "???":
            params["first_stage"]["path"] = assets["stage1"]
        if params.get("latent_stats") == "???":
            params["latent_stats"] = assets["cache"]
    if name == "UNetModel" and params.get("context_dim"):
        params["context_dim"] = TINY_TEXT["params"]["text_cfg"]["width"]


# ----------------------------------------------------------------------------------------------- the tests
@pytest.fixture(autouse=True)
def isolated_process_group():
    """The full stage-1 configs train with a DDP strategy: in this process, with one device, Lightning starts a
    one-process group and sets MASTER_PORT in the environment. Both would outlive the test and make later
    two-process tests in this worker bind the same port; put the process back as it was."""
    env = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.mark.slow
@pytest.mark.parametrize("bases, overrides", config_cases())
def test_config_trains(bases, overrides, assets, tmp_path):
    config = cli.load_config([str(ROOT / b) for b in bases], overrides)
    shrunk = tmp_path / "shrunk.yaml"
    OmegaConf.save(OmegaConf.create(shrink(OmegaConf.to_container(config, resolve=False), assets)), shrunk)
    assert cli.main(["--base", str(shrunk), "-t", "-l", str(tmp_path / "logs")]) == 0

    (run,) = (tmp_path / "logs").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    params = config.model.params
    assert any(k.startswith("ema.") for k in ckpt["state_dict"]) == bool(params.get("ema_decay", 0.999))
    assert list((run / "images" / "train").glob(f"*_gs-{STEPS:07d}_*.png"))
    if config.lightning.trainer.get("limit_val_batches", 1):
        rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
        assert any(v for r in rows for k, v in r.items() if k.startswith("val/")), "no validation number"

    if config.model.target.endswith("LatentDiffusion"):
        module, _ = load_diffusion(run)
        prompt = "a photo" if module.conditioning.mode == "text" else None
        images, _ = generate(module, seeds=[0, 1], batch_size=2, prompt=prompt, progress=False)
        assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8 and images.std() > 0
    else:
        autoencoder, _ = load_first_stage(run)
        size = int(config.data.params.train.params.get("size", SIZE))
        x = torch.rand(2, 3, size, size) * 2 - 1
        with torch.no_grad():
            z = autoencoder.encode(x).mode()
            assert autoencoder.decode(z).shape == x.shape and torch.isfinite(z).all()


CONFIG_TABLES = ("docs/stage1.md", "docs/stage2.md")


def true_size_counts(config_path: str, size: str | None = None) -> str:
    """Parameters of a config's networks at their real size, built on the meta device (no memory, no weights):
    stage 1 ``encoder / decoder / discriminator`` (quant convs with their half), stage 2 the backbone."""
    config = OmegaConf.load(ROOT / config_path)
    if size is not None:
        config.size = size
    model = config.model
    with torch.device("meta"):
        if model.target.endswith("AutoencoderModule"):
            ae = instantiate_from_config(model.params.autoencoder)
            halves = [[ae.encoder, getattr(ae, "quant_conv", None)], [ae.decoder, getattr(ae, "post_quant_conv", None)]]
            counts = [sum(count_params(m) for m in half if m is not None) for half in halves]
            disc = model.params.loss.params.get("discriminator")
            counts.append(count_params(instantiate_from_config(disc)) if disc else 0)
        elif model.target.endswith("DistillationModule"):  # the student only: the decoder is the teacher's
            counts = [count_params(instantiate_from_config(model.params.autoencoder.params.encoder_config))]
        else:
            counts = [count_params(instantiate_from_config(model.params.unet_config))]
    return " / ".join(f"{c:,}" for c in counts)


def size_cases() -> list:
    """(config, size preset or None): every preset of a config that has a top-level ``size`` key."""
    from autoencoder.litevae_encoder import PRESETS
    cases = []
    for config in model_configs():
        sizes = sorted(PRESETS) if "size" in OmegaConf.load(ROOT / config) else [None]
        cases += [pytest.param(config, s, id=f"{config}::{s}" if s else config) for s in sizes]
    return cases


@pytest.mark.parametrize("config, size", size_cases())
def test_true_size_parameter_counts(config, size):
    counts = true_size_counts(config, size)
    default = size == OmegaConf.load(ROOT / config).get("size")
    rows = [line for doc in CONFIG_TABLES for line in (ROOT / doc).read_text().splitlines()
            if line.startswith("|") and f"`{config}`" in line
            and (f"`size={size}`" in line or (default and "`size=" not in line) or size is None)]
    assert rows, f"{CONFIG_TABLES} have no config-table row naming `{config}`" + (f" `size={size}`" if size else "")
    assert any(re.search(rf"\|\s*{re.escape(counts)}\s*\|", row) for row in rows), \
        f"the row for {config} {size or ''} should give the parameters {counts}"
"""What several test modules share (no test module imports another): the tiny random autoencoder and its stage-1
run folder, images, latent caches and stage-2 configs, stage-1 training through the CLI, checkpoint readers, and the
fake commands that stand in for the pipeline's scripts."""
from __future__ import annotations

import copy
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from autoencoder.lightning import AutoencoderModule
from conftest import LITEVAE_TINY, ROOT, STAGE1_TEST_OVERRIDES
from ldm import cli
from ldm.checkpoints import load_first_stage
from ldm.data.images import ImageFolder
from ldm.cache.writer import CacheOptions, cache_latents, tar_key
from ldm.models.latent_diffusion import LatentDiffusion
from lab.pipeline import timestamp
from lab.stages import parse_argv
from ldm.util import instantiate_from_config


AE_CONFIG = {"target": "autoencoder.model.Autoencoder", "params": {
    "z_channels": 4,
    "encoder_config": {"target": "autoencoder.litevae_encoder.LiteVAEEncoder", "params": {
        "size": None, "z_channels": 4, "extractor_channels": 8, "extractor_mult": [1, 2],
        "aggregator_channels": 8, "aggregator_mult": [1, 2], "norm_groups": 4}},
    "decoder_config": {"target": "autoencoder.sd_vae.Decoder", "params": {
        "ch": 8, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 4, "norm_groups": 4}}}}



def data_config(folder: Path) -> dict:
    return {"target": "ldm.data.ImageFolder",
            "params": {"root": str(folder), "size": SIZE, "labels_from_subfolders": True, "flip": True}}



def run_cache(model, dataset, images, out, rank=0, world=1, **kw):
    opts = CacheOptions(out_dir=str(out), **{"samples_per_shard": 6, "batch_size": 4, **kw})
    return cache_latents(model[0], model[1], dataset, opts, data_config(images), rank, world)



def read_tars(folder: Path, pattern: str = "*.tar") -> dict[str, dict]:
    """Every sample of every shard, with only tarfile + numpy: ``{json key: {field: value}}``."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob(pattern)):
        grouped: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                grouped.setdefault(key, {})[field] = np.load(io.BytesIO(data)) if field.endswith(".npy") else data
        for key, fields in grouped.items():
            info = json.loads(fields["json"])
            assert key == tar_key(info["key"]) and info["key"] not in samples
            samples[info["key"]] = {**fields, "shard": shard.name}
    return samples



N_GOOD, SIZE, N_IMAGES, LR = 20, 32, 16, 1e-3  # cache-test images, their size, stage-2 images, LR



CLASSES = ("cat", "dog")



TINY_UNET = {"target": "ldm.modules.unet.UNetModel", "params": {
    "in_channels": 4, "out_channels": 4, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
    "attention_resolutions": [2], "num_head_channels": 8,
    "use_scale_shift_norm": True}}  # additive time embeddings vanish under per-channel GroupNorm at width 16



TINY_TEXT = {"target": "ldm.modules.conditioners.OpenCLIPTextEncoder", "params": {
    "random_init": True, "text_cfg": {"width": 32, "layers": 2, "heads": 2, "context_length": 77,
                                      "vocab_size": 49408}}}



# ------------------------------------------------------------------------------------ shared helpers
def make_images(root: Path) -> tuple[Path, Path]:
    """16 random 32x32 PNGs in two class folders, and a captions file naming the class."""
    rng = np.random.default_rng(0)
    captions = {}
    for i in range(N_IMAGES):
        cls = CLASSES[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / cls / f"img{i:02d}.png")
        captions[f"{cls}/img{i:02d}.png"] = f"a photo of a {cls} number {i}"
    captions_file = root.parent / f"{root.name}_captions.json"
    captions_file.write_text(json.dumps(captions))
    return root, captions_file



def image_dataset(images: Path, captions: Path) -> ImageFolder:
    return ImageFolder(images, size=SIZE, labels_from_subfolders=True, captions=captions)



def make_stage1_run(run: Path) -> Path:
    """A fake stage-1 run folder (project config + Lightning-style checkpoint) with random weights."""
    torch.manual_seed(0)
    ae = instantiate_from_config(AE_CONFIG)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"autoencoder.{k}": v for k, v in ae.state_dict().items()}},
               run / "checkpoints" / "last.ckpt")
    (run / "configs").mkdir()
    project = {"model": {"target": "autoencoder.lightning.AutoencoderModule", "params": {"autoencoder": AE_CONFIG}}}
    (run / "configs" / "2024-01-01T00-00-00-project.yaml").write_text(yaml.safe_dump(project))
    return run



def make_cache(stage1: Path, images: Path, captions: Path, out: Path) -> Path:
    """Latent cache of the images (train and validation splits) written by the real cache library."""
    model, info = load_first_stage(stage1)
    data_cfg = {"target": "ldm.data.ImageFolder", "params": {"root": str(images), "size": SIZE,
                                                             "labels_from_subfolders": True, "captions": str(captions)}}
    for split in ("train", "validation"):
        opts = CacheOptions(out_dir=str(out), split=split, samples_per_shard=6, batch_size=8)
        cache_latents(model, info, image_dataset(images, captions), opts, data_cfg)
    return out



def stage2_config(cache: Path, conditioning: str = "class", **params) -> dict:
    """A tiny stage-2 project config on the cache; every epoch is the same 2 batches of 4 (deterministic)."""
    unet = copy.deepcopy(TINY_UNET)
    model = {"unet_config": unet, "conditioning": conditioning, "latent_stats": str(cache),
             "first_stage": {"path": "from_manifest"}, "ema_decay": 0.999, "sample_steps": 4, "sample_cfg": 2.0,
             "cond_drop_prob": 0.25, **params}
    if conditioning == "class":
        unet["params"]["num_classes"] = len(CLASSES)
    if conditioning == "text":
        unet["params"]["context_dim"] = TINY_TEXT["params"]["text_cfg"]["width"]
        model["text_encoder_config"] = TINY_TEXT

    def latents(split: str) -> dict:
        return {"target": "ldm.cache.LatentShards", "params": {
            "root": str(cache), "split": split, "shuffle": 0, "flip": False, "seed": 0, "epoch_length": 8}}

    return {
        "model": {"base_learning_rate": LR, "target": "ldm.models.latent_diffusion.LatentDiffusion", "params": model},
        "data": {"target": "ldm.data.DataModule",
                 "params": {"batch_size": 4, "train": latents("train"), "validation": latents("validation")}},
        "lightning": {
            "trainer": {"max_steps": 2, "accelerator": "cpu", "log_every_n_steps": 1, "enable_progress_bar": False,
                        "val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 1,
                        "num_sanity_val_steps": 0, "enable_model_summary": False},
            "logger": {"tensorboard": None},
            "checkpoint": {"every_n_train_steps": 1000},
            "image_logger": {"every_n_steps": 1000, "max_images": 4}}}



def write_config(config: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)



def run_folder(logdir: Path) -> Path:
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run



def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)



def build(config: dict) -> tuple[LatentDiffusion, pl.LightningDataModule]:
    pl.seed_everything(0)
    data = instantiate_from_config(config["data"])
    model = instantiate_from_config(config["model"])
    model.learning_rate = LR
    return model, data



def trainer(tmp_path: Path, steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path), **kw)



def perturb(model: LatentDiffusion) -> None:
    """Stand-in for training: the UNet's zero-initialised output layers block most gradients at step 1, so move
    every weight off its init (in the EMA copy too) so that one step reaches every conditioning path."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.ema.module.load_state_dict(model.unet.state_dict())



# ------------------------------------------------------------------------- helpers
def train(logdir: Path, *overrides: str, config: str = LITEVAE_TINY, args: tuple[str, ...] = ()) -> Path:
    """One in-process training run; returns its run folder."""
    assert cli.main(["--base", config, "-t", "-l", str(logdir), *args, *STAGE1_TEST_OVERRIDES, *overrides]) == 0
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run



def last_ckpt(run: Path) -> dict:
    return load_ckpt(run / "checkpoints" / "last.ckpt")



def adam_steps(ckpt: dict, index: int) -> int:
    state = ckpt["optimizer_states"][index]["state"]
    return int(next(iter(state.values()))["step"]) if state else 0



def csv_rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "csv" / "metrics.csv")))



def build_module(config: str = LITEVAE_TINY, **params) -> AutoencoderModule:
    model_cfg = OmegaConf.load(config).model
    model_cfg.params = OmegaConf.merge(model_cfg.params, params)
    torch.manual_seed(0)
    return instantiate_from_config(model_cfg, where="model")



def image_batch(n: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1}



class Interrupt(Exception):
    pass



def quiet(_: str) -> None:
    pass



def fake_run(logdir: Path, name: str, rows: list[dict] | None = None) -> Path:
    run = logdir / f"{timestamp()}_{name}"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    write_csv(run / "csv" / "metrics.csv", rows or [{"step": 9, "train/loss": 1.0}])
    return run



def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)



# ------------------------------------------------------------------------------------------ compare wiring
def arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]



class FakeCommands:
    """Writes what each public command would write; can be told to interrupt the n-th command.

    Metric values differ per arm and repeat (``VALUES`` by the ``--out`` file name), so the report's spreads
    and tests have something to compute.
    """

    VALUES = {"lite_r0": 25.0, "lite_r1": 25.2, "sd_r0": 24.0, "sd_r1": 24.6}

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[list[str]] = []
        self.interrupt_at = interrupt_at

    def value(self, out: str) -> float:
        return next((v for k, v in self.VALUES.items() if Path(out).name.startswith(k + "_")), 25.0)

    def __call__(self, cmd: list[str]) -> None:
        parse_argv(cmd)  # every command the comparison builds is one its script's own parser accepts
        self.calls.append(cmd)
        script = cmd[1]
        if script == "main.py":
            self.train(cmd)
        elif script.endswith("cache_latents.py"):
            Path(arg(cmd, "--out")).mkdir(parents=True, exist_ok=True)
            (Path(arg(cmd, "--out")) / "manifest.json").write_text("{}")
        elif script.endswith("sample.py"):
            self.sample(Path(arg(cmd, "--out")))
        elif script.endswith("eval_autoencoder.py"):
            v = self.value(arg(cmd, "--out"))
            self.json(arg(cmd, "--out"), {"results": [{"weights": "ema", "psnr": v, "ssim": v / 30, "rfid": 3.0}]})
        elif script.endswith("probe_latents.py"):
            v = self.value(arg(cmd, "--out"))
            self.json(arg(cmd, "--out"), {"results": {"hf_ratio": v / 10, "eq_image_2": 1 / v, "mmd_100": v % 3,
                                                      "probe_loss": 30 - v, "probe_random_kernel_distance": v / 100}})
        elif script.endswith("eval_fid.py"):
            v = self.value(arg(cmd, "--out"))
            self.json(arg(cmd, "--out"), {"fid": v / 2, "kid_mean": 0.01, "class_accuracy": v / 30,
                                          "detector": {"comparable": False, "kind": "random"}, "n_samples": 20,
                                          "n_ref": 20})
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise Interrupt

    def train(self, cmd: list[str]) -> None:
        if "-r" in cmd:
            return
        run = fake_run(Path(arg(cmd, "-l")), arg(cmd, "-n"),
                       [{"step": s, "train/loss": 1 / s, "train/rec": 1 / s, "val/psnr_ema": 20 + s / 10,
                         "val/loss_ema": 1 / s} for s in (10, 20)])
        for name in ("inputs", "reconstructions_ema"):
            (run / "images" / "val").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16)).save(run / "images" / "val" / f"{name}_gs-0000020_e-0000.png")
        base = Path(arg(cmd, "--base"))  # the run's saved config: its first --base
        (run / "configs").mkdir()
        (run / "configs" / "2000-01-01T00-00-00-project.yaml").write_text((ROOT / base).read_text())

    @staticmethod
    def sample(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "samples.npz", arr_0=np.zeros((20, 8, 8, 3), np.uint8), labels=np.arange(20) % 2)
        Image.new("RGB", (8, 8)).save(out / "grid.png")

    @staticmethod
    def json(path: str, obj: dict) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj))



def fake_measure(runs):
    return {k: {"encoder_params": 1000 * (i + 1), "encoder_images_per_s": 50.0 / (i + 1),
                "encoder_flops": 1e6 * (i + 1), "encoder_peak_bytes": 2**20 * (i + 1)}
            for i, k in enumerate(runs)}

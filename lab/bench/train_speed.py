"""Training-step speed of the tiny configs: ``scripts/benchmark.py --suite train``.

Each variant is a real run of ``pl.Trainer.fit`` on a config plus overrides (what ``main.py`` builds, without its
logging and checkpoints): stage 1 is ``litevae_tiny.yaml`` on Fashion-MNIST (batch 8, 64², discriminator on from
step 0); stage 2 is ``fmnist_litevae_tiny.yaml`` on synthetic 4x8x8 latents (batch 64, the step is the same as on a
cache). Variants and a reference — the LiteVAE-B encoder's fp32 inference at 256², batch 2 — are timed
round-robin in one process, so a machine that slows down slows all of them. Each row gives seconds per step, the
FLOPs of one step (``FlopCounterMode``: 2 per multiply-accumulate, the same for every precision) and the achieved
GFLOP/s as a fraction of the reference's: a same-machine ratio that holds across machines of different speed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
STAGE_CONFIGS = {1: ROOT / "configs/autoencoder/litevae_tiny.yaml", 2: ROOT / "configs/ldm/fmnist_litevae_tiny.yaml"}
REFERENCE = {"target": "autoencoder.litevae_encoder.LiteVAEEncoder", "params": {"size": "B", "z_channels": 4}}


@dataclass
class Variant:
    name: str
    stage: int
    overrides: list[str] = field(default_factory=list)


# Every setting spelled out both ways, so the table means the same whatever the configs' defaults become.
FP32, BF16 = "lightning.trainer.precision=32-true", "lightning.trainer.precision=bf16-mixed"
NCHW, NHWC = "model.params.channels_last=false", "model.params.channels_last=true"
VARIANTS = [
    Variant("stage 1, fp32, NCHW", 1, [FP32, NCHW]),
    Variant("stage 1, fp32, channels_last", 1, [FP32, NHWC]),
    Variant("stage 1, bf16, channels_last", 1, [BF16, NHWC]),
    Variant("stage 2, fp32", 2, [FP32]),
    Variant("stage 2, bf16", 2, [BF16]),
]


class SyntheticLatents(Dataset):
    """4x8x8 latents with labels, each a function of its index (stage 2's input without a cache)."""

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        return {"latent": torch.randn(4, 8, 8, generator=g), "cls": i % 10}


def stage_config(variant: Variant) -> Any:
    config = OmegaConf.merge(OmegaConf.load(STAGE_CONFIGS[variant.stage]), OmegaConf.from_dotlist(variant.overrides))
    if variant.stage == 1:
        config.model.params.loss.params.disc_start = 0
    else:
        config.model.params.latent_stats, config.model.params.first_stage = None, None
    return config


class _StepClock(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the run."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.start


def fit(variant: Variant, steps: int, warmup: int = 0, callbacks: list | None = None) -> pl.LightningModule:
    """``steps`` training steps of ``variant`` (model and data built fresh, outside any timing)."""
    config = stage_config(variant)
    pl.seed_everything(0, verbose=False)
    model = instantiate_from_config(config.model, where="model")
    model.learning_rate = float(config.model.base_learning_rate)
    if variant.stage == 1:
        data = instantiate_from_config(config.data, where="data")
        loader = data.train_dataloader()
    else:
        loader = DataLoader(SyntheticLatents(), batch_size=int(config.data.params.batch_size))
    trainer = pl.Trainer(max_steps=warmup + steps, precision=config.lightning.trainer.get("precision", "32-true"),
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks or [])
    trainer.fit(model, train_dataloaders=loader)
    return model


def seconds_per_step(variant: Variant, steps: int, warmup: int) -> float:
    clock = _StepClock(warmup)
    fit(variant, steps, warmup, [clock])
    return clock.elapsed / clock.steps


def flops_per_step(variant: Variant) -> float:
    """FLOPs of one training step (the first: both optimizers step in stage 1, as the discriminator is on)."""
    with FlopCounterMode(display=False) as counter:
        fit(variant, 1)
    return float(counter.get_total_flops())


def reference_rate(repeats: int = 3) -> tuple[float, Any]:
    """(FLOPs per call, call) of the reference: LiteVAE-B encoder, fp32 inference, batch 2 at 256²."""
    torch.manual_seed(0)
    encoder = instantiate_from_config(REFERENCE).eval()
    x = torch.rand(2, 3, 256, 256) * 2 - 1

    def call() -> None:
        with torch.inference_mode():
            encoder(x)
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops()), call


def run(variants: list[Variant] | None = None, steps: int = 30, warmup: int = 5, repeats: int = 3) -> list[dict]:
    """The table rows: each variant's median seconds per step over ``repeats`` interleaved runs, and the ratios."""
    variants = variants or VARIANTS
    flops = {v.name: flops_per_step(v) for v in variants}
    ref_flops, ref_call = reference_rate()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    ref_times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(3):
            ref_call()
        ref_times.append((time.perf_counter() - t0) / 3)
        for v in variants:
            times[v.name].append(seconds_per_step(v, steps, warmup))
    ref_rate = ref_flops / statistics.median(ref_times)
    first = {}
    rows = [{"suite": "train", "name": "reference: LiteVAE-B encoder inference, fp32, 2x256²",
             "s_per_step": round(statistics.median(ref_times), 4), "gflop_per_step": round(ref_flops / 1e9, 2),
             "gflop_per_s": round(ref_rate / 1e9, 1), "fraction_of_reference": 1.0}]
    for v in variants:
        secs = statistics.median(times[v.name])
        first.setdefault(v.stage, secs)
        rows.append({"suite": "train", "name": v.name, "s_per_step": round(secs, 4),
                     "s_per_step_runs": [round(t, 4) for t in times[v.name]],
                     "gflop_per_step": round(flops[v.name] / 1e9, 2),
                     "gflop_per_s": round(flops[v.name] / secs / 1e9, 1),
                     "fraction_of_reference": round(flops[v.name] / secs / ref_rate, 3),
                     "speedup_vs_first_of_stage": round(first[v.stage] / secs, 2)})
    return rows

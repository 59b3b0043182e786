#!/usr/bin/env python
"""Wall/CPU time per training step of the tiny configs through pl.Trainer (CSV logger on, no progress bar).

Stage 1: configs/autoencoder/litevae_tiny.yaml on Fashion-MNIST (batch 8, 64x64, discriminator on from
step 0). Stage 2: configs/ldm/fmnist_litevae_tiny.yaml on synthetic 4x8x8 latents (batch 64; the step is
the same as on the cache). ``--nofused`` restores the for-loop Adam (the "before" of docs/benchmarks.md),
``--nolog`` turns ``log_dict`` into a no-op, ``--profile 1`` prints torch.profiler tables.
"""
import argparse, time, os, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
import torch, pytorch_lightning as pl
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from ldm.util import instantiate_from_config

p = argparse.ArgumentParser()
p.add_argument("--stage", type=int, default=1)
p.add_argument("--steps", type=int, default=60)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--profile", default="")
p.add_argument("--nofused", action="store_true")
p.add_argument("--nolog", action="store_true")
a = p.parse_args()
pl.seed_everything(0)
import autoencoder.lightning as AL, ldm.models.latent_diffusion as LD
if a.nofused:
    AL.fused_optimizer_kwargs = LD.fused_optimizer_kwargs = lambda d: {}
if a.nolog:
    pl.LightningModule.log_dict = lambda self, *x, **k: None

class Lat(Dataset):
    def __len__(self): return 100000
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"latent": torch.randn(4, 8, 8, generator=g), "cls": i % 10}

class Timer(pl.Callback):
    def __init__(self): self.t = {}
    def on_train_batch_start(self, tr, m, b, i):
        if i == a.warmup: self.t0 = time.perf_counter(); self.c0 = time.process_time()
    def on_train_end(self, tr, m):
        self.dt = (time.perf_counter() - self.t0) / (a.steps - a.warmup); self.ct = (time.process_time() - self.c0) / (a.steps - a.warmup)

if a.stage == 1:
    cfg = OmegaConf.load(str(ROOT / "configs/autoencoder/litevae_tiny.yaml"))
    cfg.model.params.loss.params.disc_start = 0
    model = instantiate_from_config(cfg.model)
    dm = instantiate_from_config(cfg.data); dm.setup("fit"); loader = dm.train_dataloader()
else:
    cfg = OmegaConf.load(str(ROOT / "configs/ldm/fmnist_litevae_tiny.yaml"))
    cfg.model.params.latent_stats = None; cfg.model.params.first_stage = None
    model = instantiate_from_config(cfg.model)
    loader = DataLoader(Lat(), batch_size=64, num_workers=0)
tmp = tempfile.mkdtemp()
timer = Timer()
tr = pl.Trainer(max_steps=a.steps, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                logger=pl.loggers.CSVLogger(tmp), log_every_n_steps=cfg.lightning.trainer.log_every_n_steps,
                enable_checkpointing=False, callbacks=[timer], accelerator="cpu", num_sanity_val_steps=0)
if a.profile:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr.fit(model, train_dataloaders=loader)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
else:
    tr.fit(model, train_dataloaders=loader)
print(f"STAGE{a.stage} nofused={a.nofused} nolog={a.nolog} wall s/step = {timer.dt:.4f} cpu s/step = {timer.ct:.4f} (steps {a.warmup}..{a.steps}) load={os.getloadavg()[0]:.2f}")

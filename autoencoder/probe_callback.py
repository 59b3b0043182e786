"""Latent probes while stage 1 trains: the downstream signal watched as curves, not after a diffusion run.

Off by default; switch it on in a stage-1 config (or on the command line) as one of ``lightning.callbacks``::

    lightning:
      callbacks:
        latent_probes:
          target: autoencoder.probe_callback.LatentProbes
          params: {every_n_steps: 250, probes: [spectrum, equivariance, gaussian], n_images: 128}

Every ``every_n_steps`` optimizer steps (and at the last) it runs ``ldm.evaluation.probes.run_probes`` with the
autoencoder's current weights (EMA when the run keeps one) on a fixed subset: the first ``n_images`` of the
validation split (else the train split), read once. The numbers go to every logger as ``probe/<name>``
(``csv/metrics.csv``, TensorBoard, wandb) and each call's cost is printed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from ldm.evaluation.probes import PROBES, DiffusionProbe, first_images, run_probes
from ldm.util import check_range

log = logging.getLogger(__name__)


class LatentProbes(pl.Callback):
    def __init__(self, every_n_steps: int = 250, probes: Sequence[str] = ("spectrum", "equivariance", "gaussian"),
                 n_images: int = 128, diffusion_steps: int = 200, use_ema: bool = True, seed: int = 0):
        check_range("every_n_steps", every_n_steps, 1)
        check_range("n_images", n_images, 4)
        unknown = set(probes) - set(PROBES)
        if unknown:
            raise ValueError(f"lightning.callbacks latent_probes: unknown probe(s) {sorted(unknown)}; "
                             f"choose from {PROBES}")
        self.every_n_steps, self.probes, self.n_images = every_n_steps, tuple(probes), n_images
        self.diffusion = DiffusionProbe(steps=diffusion_steps, seed=seed)
        self.use_ema, self.seed = use_ema, seed
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._last_step = -1

    def _fixed_subset(self, trainer: pl.Trainer) -> None:
        datasets = getattr(trainer.datamodule, "datasets", {})
        dataset = datasets.get("validation", datasets.get("train"))
        if dataset is None:
            raise ValueError("latent probes need the DataModule's validation or train dataset")
        if hasattr(dataset, "__len__"):
            dataset = Subset(dataset, range(min(self.n_images, len(dataset))))
        self._images, self._labels = first_images(DataLoader(dataset, batch_size=32), self.n_images)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step != self._last_step and (step % self.every_n_steps == 0 or step >= (trainer.max_steps or -1) > 0):
            self._last_step = step
            self.probe(trainer, pl_module)

    @torch.no_grad()
    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._images is None:
            self._fixed_subset(trainer)
        ema = getattr(pl_module, "ema", None)
        autoencoder = ema.module if self.use_ema and ema is not None else pl_module.autoencoder
        was_training = autoencoder.training
        autoencoder.eval()
        start = time.perf_counter()
        with torch.enable_grad():  # the diffusion probe trains its own small model
            results = run_probes(autoencoder, self._images.to(pl_module.device),
                                 None if self._labels is None else self._labels.to(pl_module.device),
                                 self.probes, self.diffusion, seed=self.seed)
        autoencoder.train(was_training)
        scalars = {f"probe/{k}": float(v) for k, v in results.items()
                   if isinstance(v, (int, float)) and k not in ("n_images",)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        log.info("latent probes at step %d: %.1f s (%s)", trainer.global_step, time.perf_counter() - start,
                 ", ".join(self.probes))
        return scalars

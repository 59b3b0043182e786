"""Lightning callbacks shared by both stages: config dump, image grids, throughput/memory, signals."""
from __future__ import annotations

import logging
import resource
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from ldm.util import image_grid, is_empty_batch

log = logging.getLogger(__name__)


class SetupCallback(pl.Callback):
    """Creates the run folder and writes the merged config (rank 0) when fitting starts."""

    def __init__(self, logdir: str, config: DictConfig, now: str):
        self.logdir, self.config, self.now = Path(logdir), config, now

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sub in ("configs", "checkpoints", "images"):
            (self.logdir / sub).mkdir(parents=True, exist_ok=True)
        path = self.logdir / "configs" / f"{self.now}-project.yaml"
        OmegaConf.save(self.config, path)
        log.info("run folder %s (config saved to %s)", self.logdir, path.name)


class ImageLogger(pl.Callback):
    """Saves ``pl_module.log_images(batch, split)`` grids as PNG under ``images/{split}/``.

    Train grids every ``every_n_steps`` optimizer steps; validation grids once per validation run
    (first batch). Also forwards them to TensorBoard/wandb when such a logger is attached.
    """

    def __init__(self, logdir: str, every_n_steps: int = 1000, max_images: int = 8, log_first_step: bool = False):
        self.root = Path(logdir) / "images"
        self.every_n_steps, self.max_images, self.log_first_step = every_n_steps, max_images, log_first_step
        self._last_train_step = -1

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, split: str) -> None:
        if not hasattr(pl_module, "log_images") or is_empty_batch(batch):  # every image of it was unreadable
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, max_images=self.max_images)
        pl_module.train(was_training)
        if trainer.global_rank != 0:
            return
        out = self.root / split
        out.mkdir(parents=True, exist_ok=True)
        for name, tensor in images.items():
            grid = torch.from_numpy(image_grid(tensor)).permute(2, 0, 1)  # CHW for write_png / TensorBoard
            path = out / f"{name}_gs-{trainer.global_step:07d}_e-{trainer.current_epoch:04d}.png"
            torchvision.io.write_png(grid, str(path))
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):  # TensorBoard
                    experiment.add_image(f"{split}/{name}", grid, trainer.global_step)
                elif hasattr(logger, "log_image"):  # wandb
                    logger.log_image(key=f"{split}/{name}", images=[grid.permute(1, 2, 0).numpy()],
                                     step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 and (step > 0 or self.log_first_step)
        due = due or step == trainer.max_steps  # a run shorter than the interval still ends with grids
        if due and step != self._last_train_step:
            self._last_train_step = step
            self._log(trainer, pl_module, batch, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._log(trainer, pl_module, batch, "val")


class ValidateAtLastStep(pl.Callback):
    """Validates after the last training step whatever ``val_check_interval`` says, so that every run, one shorter
    than its interval included, ends with validation numbers and grids.

    How: Lightning validates mid-epoch when a run is asked to stop (``should_stop``, as early stopping does), so the
    last step asks; where validation was due at that step anyway it still runs once.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class ThroughputMonitor(pl.Callback):
    """Logs training samples/s and peak memory (CUDA allocator peak, or the process's max RSS on CPU)."""

    def __init__(self, log_every_n_steps: int = 50):
        self.log_every_n_steps = log_every_n_steps
        self._t0, self._samples = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        data = next((batch[k] for k in ("image", "latent") if k in batch), None) if isinstance(batch, dict) else None
        self._samples += data.shape[0] if data is not None else 0
        if (batch_idx + 1) % self.log_every_n_steps:
            return
        elapsed = time.perf_counter() - self._t0
        metrics = {"perf/samples_per_sec": self._samples * trainer.world_size / max(elapsed, 1e-9)}
        if pl_module.device.type == "cuda":
            metrics["perf/peak_mem_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            metrics["perf/max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._samples = time.perf_counter(), 0


class CheckpointOnSignal(pl.Callback):
    """Saves ``last.ckpt`` at the next batch boundary after SIGUSR1 (e.g. SLURM's pre-emption warning).

    Under DDP the ranks decide together (one boolean all-reduce per step): saving holds a barrier, so a rank
    that saved on its own, while another got the signal a batch later or not at all, would desynchronise the
    collectives and hang the run.
    """

    def __init__(self, ckpt_path: str, sig: int = signal.SIGUSR1):
        self.ckpt_path, self.sig = ckpt_path, sig
        self._requested = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            signal.signal(self.sig, self._request)
        except ValueError:  # not in the main thread (e.g. some launchers); nothing to install
            log.warning("cannot install signal handler for %s outside the main thread", self.sig)

    def _request(self, signum, frame) -> None:
        self._requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self._requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)  # any rank signalled
        if requested:
            self._requested = False
            log.info("rank %d: saving %s on signal", trainer.global_rank, self.ckpt_path)
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)

"""Stage-1 LightningModule: trains any ``Autoencoder`` (LiteVAE or the SD-VAE baseline) with a GAN loss.

Manual optimisation (Lightning 2 requires it for two optimizers): an autoencoder step and, once the
discriminator is active, a discriminator step per batch. ``global_step`` counts autoencoder optimizer
steps only, so ``max_steps``, ``disc_start`` and checkpoint intervals all mean the same thing: Lightning
counts the steps made through its optimizer wrapper, so the discriminator steps its torch optimizer directly.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer

from ldm.ema import EMA
from ldm.metrics.image import psnr, ssim
from ldm.util import (batch_missing, check_finite, check_range, clip_gradients, fused_optimizer_kwargs,
                      instantiate_from_config, is_empty_batch, match_optimizer_state_layout, maybe_compile, run_seed,
                      step_generator)

log = logging.getLogger(__name__)


_CROP_STREAM, _NOISE_STREAM, _SCALE_STREAM = 0, 1, 2


def _with_equivariance(loss: Mapping, weight: float | None, factors: Sequence[float] | None) -> Mapping:
    """Configs written before the equivariance term moved into the loss set it on the module
    (``model.params.equivariance_weight``); such a setting is handed to the loss, its one home."""
    moved = {k: v for k, v in (("equivariance_weight", weight), ("equivariance_factors", factors)) if v is not None}
    if not moved:
        return loss
    log.info("model.params.%s -> model.params.loss.params (the loss holds every stage-1 term)", ", ".join(moved))
    return {**loss, "params": {**(loss.get("params") or {}), **moved}}


class AutoencoderModule(pl.LightningModule):
    def __init__(
        self,
        autoencoder: Mapping,
        loss: Mapping,
        ema_decay: float | None = 0.999,
        betas: tuple[float, float] = (0.5, 0.9),
        disc_learning_rate: float | None = None,
        accumulate_grad_batches: int = 1,
        grad_clip: float | None = None,
        freeze_encoder: bool = False,
        train_crop_schedule: Mapping[int, int] | None = None,
        image_key: str = "image",
        compile: bool = False,
        channels_last: bool = True,
        equivariance_weight: float | None = None,
        equivariance_factors: tuple[float, ...] | None = None,
    ):
        super().__init__()
        check_range("accumulate_grad_batches", accumulate_grad_batches, 1)
        check_range("grad_clip", grad_clip, 0, above=True)
        check_range("ema_decay", ema_decay, 0, 1)
        for step, size in (train_crop_schedule or {}).items():
            check_range(f"train_crop_schedule[{step}]", size, 1)
        self.automatic_optimization = False
        self.autoencoder = instantiate_from_config(autoencoder, where="model.params.autoencoder")
        self.loss = instantiate_from_config(_with_equivariance(loss, equivariance_weight, equivariance_factors),
                                            where="model.params.loss")
        self.ema = EMA(self.autoencoder, ema_decay) if ema_decay else None
        self.betas, self.disc_learning_rate = tuple(betas), disc_learning_rate
        self.accumulate_grad_batches, self.grad_clip = int(accumulate_grad_batches), grad_clip
        self.freeze_encoder, self.image_key = freeze_encoder, image_key
        # NHWC activations and weights: oneDNN's CPU convolutions skip a layout conversion per call (this step:
        # 1.25x on 2 CPU cores, docs/benchmarks.md), and CUDA's tensor-core kernels want NHWC too.
        self.channels_last = channels_last
        # {step: size}: from `step` on, training batches are randomly cropped to `size` (paper Table 5:
        # pretrain at 128, fine-tune at 256). Sorted so the last entry <= step wins.
        self.train_crop_schedule = sorted((int(k), int(v)) for k, v in (train_crop_schedule or {}).items())
        self.learning_rate = 1e-4  # set by the CLI from model.base_learning_rate
        self._micro_batches = 0  # micro-batches accumulated since the last optimizer step
        if freeze_encoder:
            self.autoencoder.encoder.requires_grad_(False)
        # torch.compile (for CUDA runs), applied after the EMA copy so the shadow model stays eager;
        # module.compile() keeps the state_dict keys.
        for part in (self.autoencoder.encoder, self.autoencoder.decoder):
            maybe_compile(part, compile)

    # ------------------------------------------------------------------ inputs
    def train_crop_size(self, step: int) -> int | None:
        size = None
        for start, s in self.train_crop_schedule:
            if step >= start:
                size = s
        return size

    def train_generator(self, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        """This micro-batch's generator for ``stream`` (crop offsets, posterior noise): ``ldm.util.step_generator``
        seeded by the run's ``--seed``, so a resumed run draws exactly what an uninterrupted one would."""
        return step_generator(run_seed(), self.global_step, self._micro_batches, self.global_rank, stream, device)

    def get_input(self, batch: Mapping[str, Any], train: bool = False) -> torch.Tensor:
        x = batch[self.image_key]
        size = self.train_crop_size(self.global_step) if train else None
        if size is not None and size < x.shape[-1]:
            g = self.train_generator(_CROP_STREAM)
            top = int(torch.randint(0, x.shape[-2] - size + 1, (), generator=g))
            left = int(torch.randint(0, x.shape[-1] - size + 1, (), generator=g))
            x = x[..., top:top + size, left:left + size]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def reconstruct(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        encoder_ctx = torch.no_grad() if self.freeze_encoder else contextlib.nullcontext()
        with encoder_ctx:
            posterior = self.autoencoder.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.autoencoder.decode(z), posterior

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if self.channels_last:  # before the optimizers are built and any checkpoint is restored into them
            self.to(memory_format=torch.channels_last)
        # A grad scaler only sees steps made through Lightning's optimizer wrapper, which the discriminator's skips.
        if stage == "fit" and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"stage 1 does not support precision={self.trainer.precision!r} (a grad scaler); "
                             "use lightning.trainer.precision=bf16-mixed or 32-true")

    def on_train_start(self) -> None:
        for optimizer in self.trainer.optimizers:  # state restored from a run of another layout (-r)
            match_optimizer_state_layout(optimizer)
        if self.ema is not None:
            self.ema.update_after_each_step(self.autoencoder, self.trainer.optimizers[0])

    def training_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        if batch_missing(self, batch):
            return
        optimizers = self.optimizers()
        opt_ae, opt_d = (optimizers if isinstance(optimizers, list) else (optimizers, None))
        step = self.global_step
        # Step after k micro-batches, and at the end of an epoch so no gradient leaks into the next one.
        boundary = self._micro_batches + 1 == self.accumulate_grad_batches or self.trainer.is_last_batch

        x = self.get_input(batch, train=True)
        xrec, posterior = self.reconstruct(x, generator=self.train_generator(_NOISE_STREAM, x.device))
        discriminator = getattr(self.loss, "discriminator", None)
        if discriminator is not None:  # the generator's adversarial term must not fill D's gradients
            discriminator.requires_grad_(False)
        g_loss, logs = self.loss.generator_loss(x, xrec, posterior, step, last_layer=self.autoencoder.last_layer,
                                                decode=self.autoencoder.decode,
                                                generator=self.train_generator(_SCALE_STREAM))
        if discriminator is not None:
            discriminator.requires_grad_(True)
        check_finite(g_loss, step, logs)
        self.manual_backward(g_loss / self.accumulate_grad_batches)
        if boundary:
            self._step(opt_ae)

        if opt_d is not None and self.loss.disc_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, xrec.detach(), step)
            check_finite(d_loss, step, d_logs)
            logs = {**logs, **d_logs}
            self.manual_backward(d_loss / self.accumulate_grad_batches)
            if boundary:
                self._step(opt_d)
        self._micro_batches = 0 if boundary else self._micro_batches + 1
        for keys, bar in (({"loss", "rec"}, True), (logs.keys() - {"loss", "rec"}, False)):
            self.log_dict({f"train/{k}": logs[k] for k in keys}, prog_bar=bar, on_step=True, on_epoch=False,
                          batch_size=x.shape[0])

    def _step(self, optimizer: LightningOptimizer) -> None:
        """Clip, step, zero the gradients. Only the autoencoder's step goes through Lightning's wrapper, the one
        that counts it in ``global_step``; the discriminator's torch optimizer steps uncounted."""
        clip_gradients(self, optimizer, self.grad_clip)
        counted = optimizer.optimizer is self.trainer.optimizers[0]  # configure_optimizers: autoencoder first
        (optimizer if counted else optimizer.optimizer).step()
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        ae_params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        fused = fused_optimizer_kwargs(self.device)
        opt_ae = torch.optim.Adam(ae_params, lr=self.learning_rate, betas=self.betas, **fused)
        discriminator = getattr(self.loss, "discriminator", None)
        if discriminator is None:
            return opt_ae
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=self.disc_learning_rate or self.learning_rate,
                                 betas=self.betas, **fused)
        return [opt_ae, opt_d]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        if is_empty_batch(batch):
            return
        x = self.get_input(batch)
        models = {"": self.autoencoder, **({"_ema": self.ema.module} if self.ema is not None else {})}
        metrics = {}
        for suffix, model in models.items():
            posterior = model.encode(x)
            xrec = model.decode(posterior.mode())
            metrics[f"val/psnr{suffix}"] = psnr(xrec, x).mean()
            metrics[f"val/ssim{suffix}"] = ssim(xrec, x).mean()
            if suffix == "":
                _, logs = self.loss.generator_loss(x, xrec, posterior, self.global_step, last_layer=None)
                metrics.update({f"val/{k}": v for k, v in logs.items()})
            elif getattr(self.loss, "lpips", None) is not None:
                metrics[f"val/lpips{suffix}"] = self.loss.lpips(xrec.float(), x.float()).mean()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str = "train", max_images: int = 8) -> dict:
        x = self.get_input(batch)[:max_images]
        xrec, _ = self.reconstruct(x, sample=False)
        images = {"inputs": x, "reconstructions": xrec,
                  "difference": ((x - xrec).abs().mean(1, keepdim=True).clamp(0, 1) * 2 - 1).expand_as(x)}
        if self.ema is not None:
            images["reconstructions_ema"] = self.ema.module.decode(self.ema.module.encode(x).mode())
        return images

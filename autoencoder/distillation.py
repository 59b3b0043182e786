"""Encoder distillation: a LiteVAE encoder trained to reproduce a frozen teacher autoencoder's posterior,
with the teacher's decoder reused, so the latent space, and every diffusion model trained on it, stays the
teacher's while the encoder gets cheaper.

``DistilledAutoencoder`` is the first stage it makes: the student encoder + the teacher's decoder side (its
``decode``, post-quant conv included; the teacher's encoder is dropped). The teacher is any first stage the project
loads (a stage-1 run, an export, a diffusers ``AutoencoderKL`` folder): ``teacher_source`` names it, and its
architecture (``teacher_config``, read from the source when not given) is rebuilt here, so a distilled checkpoint
or export holds every weight it needs. ``DistillationModule`` trains it:

    loss = mean_weight · ‖μ_s − μ_t‖² + logvar_weight · ‖log σ²_s − log σ²_t‖² + reconstruction_weight · |D_t(μ_s) − x|

(means over elements; the reconstruction term goes through the frozen teacher decoder). Validation logs the
latent error relative to the teacher latents' variance and the PSNR of the student's reconstruction next to the
teacher's own.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.first_stage.posterior import DiagonalGaussian
from ldm.ema import EMA
from ldm.metrics.image import psnr
from ldm.util import check_range, instantiate_from_config


def build_first_stage(config: Mapping[str, Any]) -> nn.Module:
    """An autoencoder with fresh weights from an identity's ``{target, params}``: ours by target, a diffusers
    class (``diffusers.<Class>``) through its ``from_config``."""
    from ldm.first_stage.diffusers import DIFFUSERS_TARGET, DiffusersAutoencoder, _model_class

    target = config["target"]
    if target.startswith(DIFFUSERS_TARGET):
        return DiffusersAutoencoder(_model_class(target[len(DIFFUSERS_TARGET):]).from_config(dict(config["params"])))
    return instantiate_from_config(dict(config), where="teacher_config")


def _drop_encoder(autoencoder: nn.Module) -> None:
    """Only the decoder side of the teacher is kept in the distilled model."""
    holder = getattr(autoencoder, "vae", autoencoder)  # DiffusersAutoencoder keeps the diffusers model in .vae
    holder.encoder = None


def teacher_identity(source: str) -> dict[str, Any]:
    """The teacher's ``{target, params}``, as its loader records it (plain containers, the form manifests hold)."""
    from ldm.checkpoints import load_first_stage

    return load_first_stage(source)[1]["config"]


class DistilledAutoencoder(nn.Module):
    """Student encoder + teacher decoder, with the first-stage API (``encode`` -> posterior, ``decode``)."""

    def __init__(self, encoder_config: Mapping[str, Any], teacher_source: str | None = None,
                 teacher_config: Mapping[str, Any] | None = None):
        super().__init__()
        if teacher_config is None:
            if teacher_source is None:
                raise ValueError("DistilledAutoencoder needs teacher_source or teacher_config")
            teacher_config = teacher_identity(teacher_source)
        self.teacher_source, self.teacher_config = teacher_source, dict(teacher_config)
        self.encoder = instantiate_from_config(dict(encoder_config), where="encoder_config")
        self.encoder_config = dict(encoder_config)
        self.teacher = build_first_stage(teacher_config)
        _drop_encoder(self.teacher)
        self.teacher.requires_grad_(False)

    @property
    def downsample_factor(self) -> int:
        return int(self.teacher.downsample_factor)

    @property
    def decoder(self) -> nn.Module:
        return self.teacher.decoder

    def release_config(self) -> dict[str, Any]:
        """A config that rebuilds this model without the teacher's files (exports write it)."""
        return {"target": f"{type(self).__module__}.{type(self).__name__}",
                "params": {"encoder_config": self.encoder_config, "teacher_config": self.teacher_config}}

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.teacher.decode(z)


class DistillationModule(pl.LightningModule):
    """Trains ``autoencoder`` (a ``DistilledAutoencoder`` config)'s student encoder against its teacher."""

    def __init__(self, autoencoder: Mapping[str, Any], mean_weight: float = 1.0, logvar_weight: float = 0.1,
                 reconstruction_weight: float = 0.0, ema_decay: float | None = 0.999, image_key: str = "image"):
        super().__init__()
        for name, value in (("mean_weight", mean_weight), ("logvar_weight", logvar_weight),
                            ("reconstruction_weight", reconstruction_weight)):
            check_range(name, value, 0)
        check_range("ema_decay", ema_decay, 0, 1)
        from ldm.checkpoints import load_first_stage

        params = dict(autoencoder.get("params") or {})
        if params.get("teacher_source") is None:
            raise ValueError("model.params.autoencoder.params.teacher_source: distillation needs the teacher's "
                             "weights (a stage-1 run, export or diffusers folder)")
        teacher, info = load_first_stage(params["teacher_source"])  # read once: its config builds the decoder side
        self.autoencoder = instantiate_from_config(
            {"target": autoencoder["target"], "params": {**params, "teacher_config": params.get("teacher_config")
                                                          or info["config"]}},
            where="model.params.autoencoder")
        kept = self.autoencoder.teacher.state_dict().keys()
        self.autoencoder.teacher.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in kept})
        self._teacher = [teacher]  # a list: frozen, not a submodule, so never saved in the checkpoint
        self.weights = (mean_weight, logvar_weight, reconstruction_weight)
        self.ema = EMA(self.autoencoder, ema_decay) if ema_decay else None
        self.image_key = image_key
        self.learning_rate = 1e-4  # set by the CLI from model.base_learning_rate

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher on this module's device (not a submodule, so Lightning does not move it)."""
        self._teacher[0] = self._teacher[0].to(self.device)
        return self._teacher[0]

    def on_train_start(self) -> None:
        if self.ema is not None:
            self.ema.update_after_each_step(self.autoencoder, self.trainer.optimizers[0])

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher.encode(x)
        student = self.autoencoder.encode(x)
        logs = {"mean": F.mse_loss(student.mean, target.mean.float()),
                "logvar": F.mse_loss(student.logvar, target.logvar.float())}
        mean_w, logvar_w, rec_w = self.weights
        loss = mean_w * logs["mean"] + logvar_w * logs["logvar"]
        if rec_w > 0:
            logs["rec"] = (self.autoencoder.decode(student.mean).float() - x.float()).abs().mean()
            loss = loss + rec_w * logs["rec"]
        return {"loss": loss, **logs}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logs = self.losses(batch[self.image_key])
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, prog_bar=True, on_step=True,
                      on_epoch=False, batch_size=len(batch[self.image_key]))
        return logs["loss"]

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x = batch[self.image_key]
        target = self.teacher.encode(x)
        teacher_rec = self.teacher.decode(target.mode()).float().clamp(-1, 1)
        metrics = {"val/psnr_teacher": psnr(teacher_rec, x).mean()}
        models = {"": self.autoencoder, **({"_ema": self.ema.module} if self.ema is not None else {})}
        for suffix, model in models.items():
            z = model.encode(x).mode()
            metrics[f"val/latent_error{suffix}"] = F.mse_loss(z, target.mode().float()) / target.mode().var()
            metrics[f"val/psnr{suffix}"] = psnr(model.decode(z).float().clamp(-1, 1), x).mean()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.autoencoder.encoder.parameters(), lr=self.learning_rate, weight_decay=0.0)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str = "train", max_images: int = 8) -> dict:
        x = batch[self.image_key][:max_images]
        return {"inputs": x, "teacher": self.teacher.decode(self.teacher.encode(x).mode()),
                "student": self.autoencoder.decode(self.autoencoder.encode(x).mode())}

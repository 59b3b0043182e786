"""Stage-2 LightningModule: a denoiser (``unet_config``: the LDM UNet or a DiT) trained on first-stage latents.

Objective (``objective``): ``ddpm`` (a noise schedule, eps or v prediction, DDIM/DDPM/DPM-Solver++ sampling) or
``flow`` (flow matching on the linear path x_t = (1 - t) x0 + t eps with velocity prediction, uniform or
logit-normal ``time_sampler``, Euler/Heun/Euler-Maruyama sampling with an optional guidance interval); see
``ldm.diffusion``.

Input modes (``input``):

* ``cached`` (default): batches come from ``ldm.cache.LatentShards`` and ``batch["latent"]`` is already
  normalised, ``z_norm = (z - shift) * scale_factor``, with the cache manifest's statistics.
* ``live``: batches are images; a frozen first stage encodes them and the same normalisation is applied
  with the statistics of ``latent_stats`` (the cache manifest), so both modes train on the same batches.

The first stage (needed for ``live`` and for decoding sample grids) and the text encoder are frozen and
kept outside the module tree: they are loaded from their own files, never saved in stage-2 checkpoints,
and never seen by the optimizer or DDP. ``scale_factor``, ``shift`` and ``latent_shape`` are buffers, and
the first stage's identity (config, checkpoint path, SHA-256, ema/raw weights) is saved next to them
(``on_save_checkpoint``), so a checkpoint alone says how to turn samples back into images, like EDM2's
snapshots that carry their encoder: sampling needs no latent cache (``ldm.checkpoints.load_diffusion``).

Files are read by the factory ``from_params`` (what ``instantiate_from_config`` calls with ``model.params``:
the cache manifest, once, and the first stage), never by ``__init__``, which takes values.

Training noise (timesteps, eps, CFG dropout) is drawn from a generator seeded by (seed, step, micro-batch,
rank), not from the global RNG, so a resumed run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.checkpoints import (FIRST_STAGE_KEY, FROM_MANIFEST, first_stage_identity, first_stage_mismatch,
                             load_first_stage, load_recorded_first_stage)
from ldm.cache.manifest import read_latent_stats
from ldm.diffusion.objectives import DDPM_SAMPLERS, OBJECTIVES, make_objective
from ldm.ema import EMA
from ldm.models.conditioning import Conditioning
from ldm.util import (ConfigError, batch_missing, check_finite, check_range, clip_gradients, fused_optimizer_kwargs,
                      instantiate_from_config, is_empty_batch, match_optimizer_state_layout, maybe_compile, run_seed,
                      step_generator)

log = logging.getLogger(__name__)

INPUTS = ("cached", "live")
__all__ = ["DDPM_SAMPLERS", "OBJECTIVES", "LatentDiffusion"]
# Config-only params: ``from_params`` turns them into the values ``__init__`` takes.
FILE_PARAMS = ("first_stage", "latent_stats")


def _check_set(params: Mapping[str, Any], where: str = "model.params") -> None:
    """Fail early, naming the key, on OmegaConf's ``???`` (a value the config says the user must provide)."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            _check_set(value, f"{where}.{key}")
        elif isinstance(value, str) and value == "???":
            raise ValueError(f"{where}.{key} must be set (the config leaves it as ???); pass {where}.{key}=...")


def _load_first_stage(config: Mapping | None, cached: Mapping | None) -> tuple[nn.Module | None, dict | None]:
    """The configured first stage and its identity; it must be the one that made the cached latents."""
    if not config or not config.get("path"):
        return None, None
    if config["path"] == FROM_MANIFEST:
        if not cached or not cached.get("ckpt_path"):
            raise ValueError("first_stage.path=from_manifest needs latent_stats pointing at a manifest that "
                             "records the autoencoder's ckpt_path")
        model, info = load_recorded_first_stage(cached)
    else:
        model, info = load_first_stage(config["path"], use_ema=config.get("use_ema", True))
    log.info("first stage: %s (%s weights, sha256 %s)", info["ckpt_path"], info["weights"], info["sha256"][:12])
    problem = first_stage_mismatch(cached, info) if cached else None
    if problem:  # e.g. the stage-1 run went on after caching: its decoder no longer matches the cached latents
        raise ValueError(f"{problem}: re-cache, or set first_stage.path to the checkpoint that made the cache")
    return model, first_stage_identity(info)


BACKBONE = "model.params.unet_config.params"


def _check_backbone(backbone: nn.Module, conditioning: str, latent_shape: Sequence[int] | None) -> None:
    """The backbone fits the conditioning and the latents: a mismatch fails at start, naming the keys to change."""
    classes = getattr(backbone, "num_classes", None)
    if conditioning == "class" and classes is None:
        raise ConfigError(f"model.params.conditioning=class needs a class-conditional backbone: set {BACKBONE}."
                          "num_classes=<number of classes>, or model.params.conditioning=none for an unconditional model")
    if conditioning != "class" and classes is not None:
        raise ConfigError(f"model.params.conditioning={conditioning} but the backbone is class-conditional "
                          f"({BACKBONE}.num_classes={classes}): for an unconditional model also set {BACKBONE}."
                          "num_classes=null; for a class-conditional one, model.params.conditioning=class")
    if not latent_shape:
        return
    channels, size = int(latent_shape[0]), tuple(int(s) for s in latent_shape[1:])
    if getattr(backbone, "in_channels", channels) != channels:
        raise ConfigError(f"{BACKBONE}.in_channels={backbone.in_channels} but the latents have {channels} channels "
                          f"(latent_shape {list(latent_shape)} from latent_stats): set {BACKBONE}.in_channels={channels}"
                          " (and out_channels, where the backbone has one)")
    if getattr(backbone, "input_size", size) != size:  # a DiT is built for one latent size
        value = size[0] if size[0] == size[1] else list(size)
        raise ConfigError(f"{BACKBONE}.input_size={list(backbone.input_size)} but the latents are {list(size)} "
                          f"(latent_shape {list(latent_shape)} from latent_stats): set {BACKBONE}.input_size={value}")


class LatentDiffusion(pl.LightningModule):
    # Buffers that describe the latents this run trains on, not learned weights: ``main.py --init-from`` keeps
    # the values this run's config set (a fine-tune on another cache uses that cache's normalisation); see
    # ``_init_normalisation``, which lists only the buffers the config did set.
    KEEP_ON_INIT_FROM: tuple[str, ...] = ()

    def __init__(
        self,
        unet_config: Mapping,
        first_stage: nn.Module | None = None,
        first_stage_identity: Mapping[str, Any] | None = None,
        conditioning: str = "class",
        text_encoder_config: Mapping | None = None,
        objective: str = "ddpm",
        schedule: Mapping | None = None,
        parameterization: str | None = None,
        min_snr_gamma: float | None = None,
        time_sampler: Mapping | None = None,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = 0.9999,
        input: str = "cached",
        scale_factor: float | None = None,
        shift: float | Sequence[float] | None = None,
        latent_shape: Sequence[int] | None = None,
        sample_posterior: bool = True,
        sample_steps: int = 50,
        sample_cfg: float = 3.0,
        sample_eta: float = 0.0,
        sample_shift: float = 1.0,
        guidance_interval: Sequence[float] | None = None,
        log_prompts: Sequence[str] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        noise_seed: int = 0,
        latent_key: str = "latent",
        image_key: str = "image",
        label_key: str = "cls",
        text_key: str = "txt",
        compile: bool = False,
        retarget_latents: bool = False,
    ):
        super().__init__()
        if isinstance(first_stage, Mapping):
            raise TypeError("first_stage is a module here: build from a {path: ...} config with "
                            "LatentDiffusion.from_params (what instantiate_from_config calls)")
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
        if guidance_interval is not None and not (len(guidance_interval) == 2
                                                  and 0 <= guidance_interval[0] <= guidance_interval[1] <= 1):
            raise ValueError(f"guidance_interval must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 (flow time), "
                             f"got {guidance_interval!r}")
        for name, value, low, high in (("cond_drop_prob", cond_drop_prob, 0, 1), ("ema_decay", ema_decay, 0, 1),
                                       ("sample_steps", sample_steps, 1, None), ("sample_cfg", sample_cfg, 0, None),
                                       ("sample_eta", sample_eta, 0, None), ("weight_decay", weight_decay, 0, None),
                                       ("sample_shift", sample_shift, 0, None),
                                       ("lr_warmup_steps", lr_warmup_steps, 0, None)):
            check_range(name, value, low, high)
        check_range("min_snr_gamma", min_snr_gamma, 0, above=True)
        self.input_mode, self.sample_posterior = input, sample_posterior
        # The training objective (DDPM or flow matching): its loss and its samplers (ldm.diffusion.objectives).
        # Only the settings the config gives: one that belongs to the other objective is refused there.
        settings = dict(schedule=schedule, parameterization=parameterization, min_snr_gamma=min_snr_gamma,
                        time_sampler=time_sampler)
        self.objective = make_objective(objective, **{k: v for k, v in settings.items() if v is not None})
        self.sample_steps, self.sample_cfg, self.sample_eta = sample_steps, sample_cfg, sample_eta
        self.sample_shift = sample_shift
        self.guidance_interval = tuple(guidance_interval) if guidance_interval is not None else None
        self.log_prompts = list(log_prompts) if log_prompts else None
        self.betas, self.weight_decay, self.lr_warmup_steps = tuple(betas), weight_decay, lr_warmup_steps
        self.noise_seed = noise_seed
        self.latent_key, self.image_key = latent_key, image_key
        self.retarget_latents = retarget_latents
        self.learning_rate = 1e-4  # set by the CLI from model.base_learning_rate

        self._init_normalisation(scale_factor, shift, latent_shape)
        self.unet = instantiate_from_config(unet_config, where="model.params.unet_config")
        _check_backbone(self.unet, conditioning, latent_shape)
        self.ema = EMA(self.unet, ema_decay) if ema_decay else None
        maybe_compile(self.unet, compile)  # for CUDA runs; after the EMA copy, state_dict keys unchanged
        text_encoder = self._build_text_encoder(conditioning, text_encoder_config)
        self.conditioning = Conditioning(conditioning, getattr(self.unet, "num_classes", None), text_encoder,
                                         cond_drop_prob, label_key, text_key)
        # Frozen helpers live in a plain attribute: not submodules, so not in state_dict / optimizer / DDP.
        self._frozen: dict[str, nn.Module | None] = {"first_stage": first_stage}
        # Saved with the checkpoint (on_save_checkpoint): which first stage made the latents this model learns.
        self.first_stage_identity = dict(first_stage_identity) if first_stage_identity else None
        if input == "live" and first_stage is None:
            raise ValueError("input='live' needs a first stage: set model.params.first_stage.path")

    # ------------------------------------------------------------------ factories
    @classmethod
    def from_params(cls, first_stage: Mapping | None = None, latent_stats: str | None = None,
                    **params: Any) -> LatentDiffusion:
        """Build from the config's ``model.params`` (what ``instantiate_from_config`` calls); the one place that
        reads files. ``latent_stats`` (a cache folder or its manifest.json, read once) gives the normalisation
        and latent shape unless set explicitly, and the first stage that made the latents; ``first_stage.path``
        (``from_manifest``, or a stage-1 run folder / .ckpt / .safetensors) is loaded to decode (and to encode
        in ``live`` mode) and must be that first stage."""
        _check_set({"first_stage": first_stage, "latent_stats": latent_stats, **params})
        stats = read_latent_stats(latent_stats) if latent_stats else {}
        for key in ("scale_factor", "shift", "latent_shape"):
            if params.get(key) is None:
                params[key] = stats.get(key)
        cached = first_stage_identity(stats["autoencoder"]) if stats.get("autoencoder") else None
        model, loaded = _load_first_stage(first_stage, cached)
        return cls(first_stage=model, first_stage_identity=cached or loaded, **params)

    @classmethod
    def from_saved(cls, params: Mapping[str, Any], buffers: Mapping[str, torch.Tensor],
                   first_stage: nn.Module | None, first_stage_identity: Mapping[str, Any] | None
                   ) -> LatentDiffusion:
        """A trained model from its saved ``model.params`` and checkpoint buffers, without the latent cache:
        the normalisation and latent shape are the checkpoint's (``ldm.checkpoints.load_diffusion`` reads the
        files and the first stage)."""
        values = {key: value for key, value in params.items() if key not in FILE_PARAMS}
        values.update(input="cached",  # sampling encodes no images
                      scale_factor=float(buffers["scale_factor"]), shift=buffers["shift"].tolist(),
                      latent_shape=buffers["latent_shape"].tolist())
        return cls(first_stage=first_stage, first_stage_identity=first_stage_identity, **values)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[FIRST_STAGE_KEY] = self.first_stage_identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``main.py -r``) restores the normalisation buffers from the checkpoint, and the identity goes
        with them. If this run's config points at other latents (another first stage, or another normalisation)
        the run would go on training on them under the old record: refused, unless
        ``model.params.retarget_latents=true``, which keeps this config's latents, normalisation and record."""
        problems = self._latent_changes(checkpoint)
        if problems and not self.retarget_latents:
            raise ConfigError("-r: the latents differ from the ones this run trained on: " + "; ".join(problems)
                              + ". Resume with the run's own cache, or set model.params.retarget_latents=true to go on "
                              "training on these latents (their normalisation and first stage are recorded)")
        if problems:
            log.warning("retargeting the run to other latents (model.params.retarget_latents): %s", "; ".join(problems))
            for key in self.KEEP_ON_INIT_FROM:
                checkpoint["state_dict"][key] = getattr(self, key).clone()
        elif FIRST_STAGE_KEY in checkpoint:
            self.first_stage_identity = checkpoint[FIRST_STAGE_KEY]

    def _latent_changes(self, checkpoint: Mapping[str, Any]) -> list[str]:
        """How this config's latents (first stage, normalisation buffers it set) differ from the checkpoint's."""
        problems, state = [], checkpoint.get("state_dict", {})
        saved, current = checkpoint.get(FIRST_STAGE_KEY), self.first_stage_identity
        if saved and current:
            mismatch = first_stage_mismatch(saved, {"ckpt_path": current.get("ckpt_path"), **current})
            if mismatch:
                problems.append(mismatch.replace("the latents were cached with", "the run trained on latents of"))
        for key in self.KEEP_ON_INIT_FROM:  # the buffers this config set (from latent_stats or explicitly)
            mine = getattr(self, key)
            if key in state and (state[key].shape != mine.shape or not torch.allclose(state[key].float(), mine.float())):
                problems.append(f"{key} {state[key].tolist()} in the checkpoint, {getattr(self, key).tolist()} now")
        return problems

    # ------------------------------------------------------------------ construction helpers
    def _init_normalisation(self, scale: float | None, shift: Any, shape: Sequence[int] | None) -> None:
        if self.input_mode == "live" and (scale is None or shift is None):
            raise ValueError("input='live' needs latent_stats (the cache's manifest.json) or scale_factor and shift, "
                             "so that live batches are normalised exactly like cached ones")
        if scale is None:
            log.warning("no latent_stats / scale_factor: latents are decoded with scale_factor=1, shift=0")
        self.register_buffer("scale_factor", torch.tensor(float(1.0 if scale is None else scale)))
        self.register_buffer("shift", torch.as_tensor(0.0 if shift is None else shift, dtype=torch.float32).reshape(-1))
        # (0, 0, 0) = unknown yet: filled in from the first batch, then saved with the checkpoint.
        self.register_buffer("latent_shape", torch.tensor(list(shape) if shape else [0, 0, 0], dtype=torch.long))
        self.KEEP_ON_INIT_FROM = (("scale_factor",) * (scale is not None) + ("shift",) * (shift is not None)
                                  + ("latent_shape",) * bool(shape))

    @staticmethod
    def _build_text_encoder(conditioning: str, config: Mapping | None) -> nn.Module | None:
        if conditioning != "text":
            return None
        if config is None:
            raise ValueError("conditioning='text' needs model.params.text_encoder_config")
        encoder = instantiate_from_config(config, where="model.params.text_encoder_config")
        return encoder.eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        if self.conditioning.mode == "text":
            width = getattr(self.conditioning.text_encoder, "out_dim", None)
            if getattr(self.unet, "context_dim", None) != width:
                raise ValueError(f"{BACKBONE}.context_dim={getattr(self.unet, 'context_dim', None)} must "
                                 f"equal the text encoder's width {width}")
        dataset = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}).get("train")
        if stage == "fit" and hasattr(dataset, "sample_fields"):
            self.check_fields(dataset.sample_fields(), f"data.params.train ({type(dataset).__name__})")

    def check_fields(self, fields: frozenset[str] | None, source: str) -> None:
        """Refuse, before step 0, data whose samples lack what this model trains on (``fields``: the keys of a
        sample, e.g. ``ImageFolder.sample_fields``; None: unknown), naming the config keys to change."""
        if fields is None:
            return
        have = f"{source} has samples with {sorted(fields)}"
        if self.input_mode == "cached" and self.latent_key not in fields:
            raise ConfigError(f"model.params.input=cached trains on cached latents, but {have}: use "
                              "ldm.cache.LatentShards on a cache of scripts/cache_latents.py, or model.params.input=live")
        if self.input_mode == "live" and self.image_key not in fields:
            raise ConfigError(f"model.params.input=live encodes images, but {have}: use an image dataset, or "
                              "model.params.input=cached for latent shards")
        label, text = self.conditioning.label_key, self.conditioning.text_key
        if self.conditioning.mode == "class" and label not in fields:
            raise ConfigError(f"model.params.conditioning=class needs class labels ('{label}'), but {have}. For an "
                              f"unconditional model set model.params.conditioning=none {BACKBONE}.num_classes=null "
                              "(configs/ldm/uncond_small.yaml is one); for a class-conditional one, cache labelled "
                              "images (ImageFolder labels_from_subfolders: true)")
        if self.conditioning.mode == "text" and text not in fields:
            raise ConfigError(f"model.params.conditioning=text needs captions ('{text}'), but {have}: give the "
                              "images captions (ImageFolder captions: <file>, or .txt in WebDataset shards), or set "
                              "model.params.conditioning=none")
        if self.conditioning.mode == "none" and label in fields:
            log.info("%s has class labels; this unconditional model (conditioning=none) does not use them", source)

    # ------------------------------------------------------------------ frozen helpers
    @property
    def first_stage(self) -> nn.Module | None:
        model = self._frozen["first_stage"]
        if model is not None and next(model.parameters()).device != self.device:
            model.to(self.device)
        return model

    @property
    def num_classes(self) -> int | None:
        return self.conditioning.num_classes if self.conditioning.mode == "class" else None

    def inference_unet(self, use_ema: bool = True) -> nn.Module:
        return self.ema.module if (use_ema and self.ema is not None) else self.unet

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] → normalised latents, in fp32 like the cache (whatever the autocast)."""
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.first_stage.encode(x.to(self.device).float())
            z = posterior.mean
            if sample:
                draw = generator.device if generator is not None else z.device
                z = z + posterior.std * torch.randn(z.shape, generator=generator, device=draw).to(z.device)
        return self.normalise(z)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift.reshape(-1, 1, 1)) * self.scale_factor

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale_factor + self.shift.reshape(-1, 1, 1)

    def get_input(self, batch: Mapping[str, Any], train: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(z_norm, cond)``; ``train`` applies CFG dropout (and posterior sampling in live mode)."""
        if self.input_mode == "cached":
            z = batch[self.latent_key].to(self.device).float()
        else:
            z = self.encode_images(batch[self.image_key], sample=train and self.sample_posterior, generator=generator)
        if int(self.latent_shape[0]) == 0:
            self.latent_shape.copy_(torch.tensor(z.shape[1:]))
        cond = self.conditioning.from_batch(batch, self.device, dropout=train, generator=generator)
        return z, cond

    def _generator(self, batch_idx: int) -> torch.Generator:
        """This micro-batch's training noise: ``ldm.util.step_generator`` seeded by the run's ``--seed`` (exported
        by ``pl.seed_everything``) plus ``noise_seed``."""
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        seed = run_seed() + self.noise_seed
        return step_generator(seed, self.global_step, batch_idx % accumulate, self.global_rank, device=self.device)

    # ------------------------------------------------------------------ training
    def loss(self, model: nn.Module, z: torch.Tensor, cond: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's Monte-Carlo loss on a batch of normalised latents (t and noise from ``generator``)."""
        return self.objective.loss(model, z, cond, generator)

    def training_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch_missing(self, batch):
            return None
        gen = self._generator(batch_idx)
        z, cond = self.get_input(batch, train=True, generator=gen)
        loss, logs = self.loss(self.unet, z, cond, gen)
        check_finite(loss, self.global_step, logs)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=z.shape[0])
        return loss

    def on_train_start(self) -> None:
        match_optimizer_state_layout(self.trainer.optimizers[0])  # fused AdamW needs state laid out like params
        if self.ema is not None:
            self.ema.update_after_each_step(self.unet, self.trainer.optimizers[0])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # lightning.trainer.gradient_clip_val with the fused AdamW below, under any precision (see clip_gradients).
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.learning_rate, betas=self.betas,
                                      weight_decay=self.weight_decay, **fused_optimizer_kwargs(self.device))
        if not self.lr_warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / self.lr_warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any] | None, batch_idx: int) -> None:
        if is_empty_batch(batch):
            return
        z, cond = self.get_input(batch)
        metrics = {}
        models = {"": self.unet, **({"_ema": self.ema.module} if self.ema is not None else {})}
        for suffix, model in models.items():
            # The same t and noise for every validation run and both models: comparable numbers.
            gen = torch.Generator(device=self.device).manual_seed(batch_idx)
            loss, _ = self.loss(model, z, cond, gen)
            metrics[f"val/loss{suffix}"] = loss
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=z.shape[0])

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_latents(self, seeds: Sequence[int], labels: Sequence[int] | None = None,
                       texts: Sequence[str] | None = None, steps: int | None = None, eta: float | None = None,
                       cfg: float | None = None, sampler: str | None = None, use_ema: bool = True,
                       progress: bool = False) -> torch.Tensor:
        """Normalised latents, one per seed; each depends only on its seed and condition. ``sampler`` None is the
        objective's default; a sampler of the other objective is refused."""
        if int(self.latent_shape[0]) == 0:
            raise RuntimeError("latent_shape is unknown: set model.params.latent_shape (or latent_stats)")
        sampler = sampler or self.objective.default_sampler
        if sampler not in self.objective.samplers:
            raise ValueError(f"sampler {sampler!r} does not fit objective={self.objective.name!r}: use one of "
                             f"{', '.join(self.objective.samplers)}")
        n = len(seeds)
        cond, uncond = self.conditioning.for_sampling(n, self.device, labels, texts)
        scale = self.sample_cfg if cfg is None else cfg
        guide = dict(cond=cond, uncond=uncond if scale != 1.0 else None,
                     guidance_scale=scale if uncond is not None else 1.0, device=self.device, progress=progress)
        return self.objective.sample(self.inference_unet(use_ema), sampler, steps or self.sample_steps,
                                     self.sample_eta if eta is None else eta, self.sample_shift,
                                     self.guidance_interval, shape=self.latent_shape.tolist(), seeds=list(seeds),
                                     **guide)

    @torch.no_grad()
    def decode(self, z_norm: torch.Tensor) -> torch.Tensor:
        """Normalised latents → images in [-1, 1] through the first stage (fp32)."""
        if self.first_stage is None:
            raise RuntimeError("no first stage configured (model.params.first_stage.path): cannot decode latents")
        with torch.autocast(self.device.type, enabled=False):
            return self.first_stage.decode(self.denormalise(z_norm.float())).clamp(-1, 1)

    def _show_latents(self, z_norm: torch.Tensor) -> torch.Tensor:
        """Decoded images, or (without a first stage) the first 3 latent channels squashed to [-1, 1]."""
        if self.first_stage is not None:
            return self.decode(z_norm)
        z = z_norm[:, :3]
        return torch.tanh(z / 2) if z.shape[1] == 3 else torch.tanh(z[:, :1] / 2).expand(-1, 3, -1, -1)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any] | None, split: str = "train", max_images: int = 8) -> dict:
        """Fixed-seed samples (seeds 0..N-1, classes cycling 0..C-1, EMA UNet) and the batch's own latents."""
        images: dict[str, torch.Tensor] = {}
        texts = None
        if not is_empty_batch(batch):
            z, _ = self.get_input(batch)
            images["inputs"] = self._show_latents(z[:max_images])
            if self.conditioning.mode == "text":
                texts = list(batch[self.conditioning.text_key])[:max_images]
        n = max_images if texts is None else len(texts)
        if self.log_prompts:
            texts = [self.log_prompts[i % len(self.log_prompts)] for i in range(n)]
        labels = [i % self.num_classes for i in range(n)] if self.num_classes else None
        if self.conditioning.mode == "text" and texts is None:
            return images
        z = self.sample_latents(list(range(n)), labels=labels, texts=texts)
        images["samples"] = self._show_latents(z)
        return images

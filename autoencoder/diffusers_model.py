"""LiteVAE (or any autoencoder of this repository) as a diffusers model: ``ModelMixin`` + ``ConfigMixin``, with
``AutoencoderKL``'s interface, so a diffusers pipeline can take it as its ``vae``.

    from autoencoder.diffusers_model import LiteVAEModel
    vae = LiteVAEModel.from_pretrained("exports/litevae_diffusers")   # config.json + diffusion_pytorch_model.safetensors
    z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
    x = vae.decode(z / vae.config.scaling_factor).sample

``scripts/export.py --format diffusers`` writes such a folder from a stage-1 run. The network is this repository's
``autoencoder.model.Autoencoder`` built from the run's encoder/decoder configs (stored in ``config.json``), so
outputs equal the run's model; diffusers' ``DiagonalGaussianDistribution`` carries the posterior. ``enable_tiling``
and ``enable_slicing`` go through ``ldm/tiling.py`` and batch slicing; ``force_upcast`` is honoured by the
pipelines that read it. diffusers is optional: importing this module needs it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from autoencoder.model import Autoencoder
from ldm.tiling import DEFAULT_OVERLAP, decode_tiled, encode_tiled

log = logging.getLogger(__name__)


class LiteVAEModel(ModelMixin, ConfigMixin):
    """``encode(x).latent_dist`` (sample / mode / mean / kl), ``decode(z).sample``, ``forward``; images in [-1, 1]."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, encoder_config: Mapping[str, Any] | None = None,
                 decoder_config: Mapping[str, Any] | None = None, z_channels: int = 4, use_quant_conv: bool = False,
                 scaling_factor: float = 1.0, shift_factor: float | None = None, force_upcast: bool = True,
                 sample_size: int = 256, latent_channels: int | None = None, tile_sample_size: int = 512,
                 tile_overlap: int = DEFAULT_OVERLAP):
        super().__init__()
        if encoder_config is None or decoder_config is None:
            raise ValueError("LiteVAEModel needs encoder_config and decoder_config ({target, params} of this repo)")
        self.autoencoder = Autoencoder(dict(encoder_config), dict(decoder_config), z_channels, use_quant_conv)
        self.use_tiling, self.use_slicing = False, False

    @classmethod
    def from_autoencoder(cls, autoencoder: Autoencoder, config: Mapping[str, Any], **settings: Any) -> "LiteVAEModel":
        """Wrap trained weights: ``config`` is the autoencoder's ``{target, params}`` (as in a run's config)."""
        params = dict(config["params"])
        model = cls(encoder_config=params["encoder_config"], decoder_config=params["decoder_config"],
                    z_channels=params.get("z_channels", 4), use_quant_conv=params.get("use_quant_conv", False),
                    latent_channels=params.get("z_channels", 4), **settings)
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def encoder(self) -> torch.nn.Module:
        return self.autoencoder.encoder

    @property
    def decoder(self) -> torch.nn.Module:
        return self.autoencoder.decoder

    @property
    def quant_conv(self) -> torch.nn.Module | None:
        return getattr(self.autoencoder, "quant_conv", None)

    # ------------------------------------------------------------------ AutoencoderKL's switches
    def enable_tiling(self, use_tiling: bool = True) -> None:
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ------------------------------------------------------------------ the interface
    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.config.tile_sample_size:
            posterior = encode_tiled(self.autoencoder, x, self.config.tile_sample_size, self.config.tile_overlap)
        else:
            posterior = self.autoencoder.encode(x)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        factor = self.autoencoder.downsample_factor
        if self.use_tiling and max(z.shape[-2:]) * factor > self.config.tile_sample_size:
            return decode_tiled(self.autoencoder, z, self.config.tile_sample_size, self.config.tile_overlap)
        return self.autoencoder.decode(z)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        chunks = x.split(1) if self.use_slicing and len(x) > 1 else [x]
        posterior = DiagonalGaussianDistribution(torch.cat([self._moments(c) for c in chunks]))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
               ) -> DecoderOutput | tuple:
        chunks = z.split(1) if self.use_slicing and len(z) > 1 else [z]
        sample = torch.cat([self._decode(c) for c in chunks])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


def export_diffusers(source: str, out: str, use_ema: bool = True, scaling_factor: float = 1.0,
                     shift_factor: float | None = None) -> Path:
    """Write a stage-1 run as a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) of
    ``LiteVAEModel``, which every ``--ae`` / ``--first-stage`` reads back and diffusers pipelines take as their
    ``vae``. ``scaling_factor`` / ``shift_factor`` go to its config (pipelines multiply latents by them; a latent
    cache's manifest holds the dataset's values)."""
    from ldm.checkpoints import load_first_stage
    from ldm.first_stage.diffusers import diffusers_folder

    if diffusers_folder(source) is not None:
        raise ValueError(f"{source} is already a diffusers folder")
    model, info = load_first_stage(source, use_ema=use_ema)
    vae = LiteVAEModel.from_autoencoder(model, info["config"], scaling_factor=scaling_factor, shift_factor=shift_factor)
    vae.save_pretrained(out, safe_serialization=True)
    log.info("exported %s weights of %s as a diffusers folder %s", info["weights"], info["ckpt_path"], out)
    return Path(out)

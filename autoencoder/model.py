"""The first-stage autoencoder: any encoder (LiteVAE or SD) + the SD decoder, with the LDM API.

``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``, images float in [-1, 1], NCHW RGB (docs/internals.md).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from torch import Tensor, nn

from ldm.first_stage.posterior import DiagonalGaussian
from ldm.util import instantiate_from_config, load_state_dict, load_weights

log = logging.getLogger(__name__)

# Everything else in a full first-stage checkpoint (``loss.*``: LPIPS + discriminator, EMA copies...)
# belongs to training, not to the autoencoder.
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class Autoencoder(nn.Module):
    """KL autoencoder built from ``{target:, params:}`` encoder and decoder configs.

    ``use_quant_conv=True`` adds SD's 1×1 ``quant_conv`` (2z→2z) and ``post_quant_conv`` (z→z), for a
    baseline faithful to (and loadable from) the official SD-VAE; LiteVAE uses neither (Table 17).
    A config's ``ckpt_path`` (an official SD first-stage checkpoint) is read by the factory ``from_params``, with
    ``ignore_keys`` (key prefixes kept at their fresh initialisation); ``__init__`` reads no file.
    """

    def __init__(self, encoder_config: Mapping, decoder_config: Mapping, z_channels: int = 4,
                 use_quant_conv: bool = False):
        super().__init__()
        self.encoder = instantiate_from_config(encoder_config, where="encoder_config")
        self.decoder = instantiate_from_config(decoder_config, where="decoder_config")
        self.z_channels = z_channels
        self._check_compatible()
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
            self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    @classmethod
    def from_params(cls, ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), **params) -> "Autoencoder":
        """Build from a config's params (what ``instantiate_from_config`` calls), loading ``ckpt_path`` if given."""
        model = cls(**params)
        if ckpt_path is not None:
            model.load_sd_checkpoint(ckpt_path, ignore_keys=ignore_keys)
        return model

    def _check_compatible(self) -> None:
        """Fail at build time, before any compute, when the halves disagree on z or the downsampling factor."""
        for name, part in (("encoder", self.encoder), ("decoder", self.decoder)):
            z = getattr(part, "z_channels", self.z_channels)
            if z != self.z_channels:
                raise ValueError(f"{name} has z_channels={z} but the autoencoder has z_channels={self.z_channels}")
        enc_f = getattr(self.encoder, "downsample_factor", None)
        if enc_f is not None and enc_f != self.downsample_factor:
            raise ValueError(f"encoder downsamples by {enc_f} but the decoder upsamples by {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (the decoder's upsampling factor; 8 for KL-f8 and LiteVAE)."""
        return int(self.decoder.upsample_factor)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight, where the adaptive GAN weight (Esser et al.) takes gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        if hasattr(self, "quant_conv"):
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        # The posterior is fp32; hand the decoder its own parameter dtype (autocast still applies).
        z = z.to(self.decoder.conv_in.weight.dtype)
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def load_sd_checkpoint(self, path: str | Path, ignore_keys: Sequence[str] = ()) -> None:
        """Load an official SD/LDM first-stage checkpoint (``.ckpt``/``.pt`` or ``.safetensors``) strictly.

        Keys outside encoder./decoder./quant_conv./post_quant_conv. (e.g. ``loss.*``) are dropped with a log
        line; a remaining mismatch raises an error naming the missing and unexpected keys.
        """
        state = load_state_dict(path)
        kept = {k: v for k, v in state.items() if k.startswith(MODEL_PREFIXES)}
        dropped = Counter(k.split(".", 1)[0] for k in state if not k.startswith(MODEL_PREFIXES))
        if dropped:
            log.info("%s: dropped %d non-autoencoder keys (%s)", path, sum(dropped.values()),
                     ", ".join(f"{p}.*: {n}" for p, n in sorted(dropped.items())))
        if not kept:
            raise RuntimeError(f"{path}: no keys under {', '.join(MODEL_PREFIXES)}; is it a first-stage checkpoint?")
        ignore = tuple(ignore_keys)
        if ignore:
            # Ignored keys keep their current values; filling them in lets the load stay strict for the rest.
            kept = {k: v for k, v in kept.items() if not k.startswith(ignore)}
            kept.update({k: v for k, v in self.state_dict().items() if k.startswith(ignore)})
            log.info("%s: kept fresh weights for keys starting with %s", path, list(ignore))
        load_weights(self, kept, strict=True, what=f"{type(self).__name__} from {path}")
        log.info("loaded %d tensors from %s", len(kept), path)

"""diffusers autoencoders (``AutoencoderKL`` of any latent width, ``AutoencoderDC``, ``AutoencoderTiny``) as first
stages, loaded by the ``diffusers`` library itself (optional: ``pip install diffusers``).

A diffusers folder is what ``save_pretrained`` or ``huggingface-cli download <repo> --local-dir <folder>`` writes:
``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline folder holding them under ``vae/``. Only
the folder is read: nothing downloads.

Its identity has the shape of a checkpoint's, so the latent cache, stage-2 checkpoints and the first-stage check
treat it like ours: ``config = {"target": "diffusers.<Class>", "params": <the model's config>}``, ``ckpt_path`` =
the weights file, ``sha256`` of that file, ``weights = "as stored"``. ``scaling`` repeats the config's latent
scaling (``scaling_factor``, ``shift_factor``, ``latents_mean``/``latents_std``) for the cache manifest: stage 2
still normalises with the cache's dataset statistics.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ldm.first_stage.posterior import PointPosterior
from ldm.util import get_obj_from_str, sha256_file

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_TARGET = "diffusers."  # prefix of the identity's config target
SCALING_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")

# Per supported class: how the output of its ``encode`` becomes a posterior, and the config key whose length sets
# the downsampling factor (every block but the last halves the resolution). KL's posterior is diffusers' own
# DiagonalGaussianDistribution, which has our API; DC-AE and TAESD are deterministic.
_CLASSES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "AutoencoderKL": (lambda out: out.latent_dist, "block_out_channels"),
    "AutoencoderDC": (lambda out: PointPosterior(out.latent), "encoder_block_out_channels"),
    "AutoencoderTiny": (lambda out: PointPosterior(out.latents), "encoder_block_out_channels"),
    # This repository's own autoencoders in diffusers format (autoencoder/diffusers_model.py, export --format
    # diffusers): KL's interface; the model reports its downsampling factor itself.
    "LiteVAEModel": (lambda out: out.latent_dist, None),
}


# Classes of this repository saved in diffusers format, by their config's ``_class_name``: named by path, as
# configs name their targets, so the library does not import the stage-1 package.
_PROJECT_CLASSES = {"LiteVAEModel": "autoencoder.diffusers_model.LiteVAEModel"}


def _model_class(name: str) -> Any:
    diffusers = _import_diffusers()  # a clear message when diffusers is missing
    return get_obj_from_str(_PROJECT_CLASSES[name]) if name in _PROJECT_CLASSES else getattr(diffusers, name)


class DiffusersAutoencoder(nn.Module):
    """A diffusers autoencoder with the first-stage API: ``encode(x) -> posterior``, ``decode(z) -> x`` (images
    float in [-1, 1], NCHW, as diffusers' autoencoders take and return them), ``downsample_factor``, and the
    ``encoder`` / ``decoder`` halves."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        name = type(vae).__name__
        if name not in _CLASSES:
            raise ValueError(f"{name} is not a supported diffusers autoencoder ({', '.join(_CLASSES)})")
        self.vae = vae
        self._posterior, factor_key = _CLASSES[name]
        self.downsample_factor = int(vae.downsample_factor) if factor_key is None \
            else 2 ** (len(vae.config[factor_key]) - 1)

    @property
    def encoder(self) -> nn.Module:
        return self.vae.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.vae.decoder

    @property
    def quant_conv(self) -> nn.Module | None:
        """KL's 1x1 moments conv (None without one): part of the encoder side when parameters are counted."""
        return getattr(self.vae, "quant_conv", None)

    def encode(self, x: torch.Tensor) -> Any:
        return self._posterior(self.vae.encode(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # Posteriors are handed on in fp32; the decoder takes its own parameter dtype (autocast still applies).
        return self.vae.decode(z.to(self.vae.dtype)).sample


def diffusers_folder(source: str | Path) -> Path | None:
    """The folder holding a diffusers model's ``config.json``: ``source`` itself or its ``vae/`` (a pipeline
    download); None when ``source`` is neither (a stage-1 run folder, a checkpoint file)."""
    path = Path(source).expanduser()
    for folder in (path, path / "vae"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("a diffusers autoencoder needs the diffusers library: pip install diffusers "
                          "(or pip install -e '.[diffusers]')") from err
    return diffusers


def _identity(vae: nn.Module, weights: Path) -> dict[str, Any]:
    # Through JSON: tuples become lists, the form the identity has once read back from a manifest or a checkpoint.
    params = json.loads(json.dumps({k: v for k, v in vae.config.items() if not k.startswith("_")}))
    return {"config": {"target": DIFFUSERS_TARGET + type(vae).__name__, "params": params},
            "ckpt_path": str(weights), "sha256": sha256_file(weights), "weights": "as stored",
            "scaling": {k: params[k] for k in SCALING_KEYS if params.get(k) is not None}}


def load_diffusers_first_stage(folder: str | Path, device: str | torch.device = "cpu",
                               expected_config: Mapping[str, Any] | None = None
                               ) -> tuple[DiffusersAutoencoder, dict[str, Any]]:
    """The autoencoder of a diffusers folder, frozen, in eval mode on ``device``, and its identity (module doc).

    ``expected_config``: the ``{target, params}`` an identity recorded; a folder whose config differs is refused
    (its weights could still match the recorded SHA-256 while the model built around them does not).
    """
    folder = Path(folder).expanduser().resolve()
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} (only safetensors weights are "
                                f"loaded): download it too, e.g. huggingface-cli download <repo> --local-dir {folder}")
    name = json.loads((folder / CONFIG_NAME).read_text()).get("_class_name")
    if name not in _CLASSES:
        raise ValueError(f"{folder / CONFIG_NAME}: _class_name {name!r} is not a supported diffusers autoencoder "
                         f"({', '.join(_CLASSES)})")
    # Without accelerate, diffusers warns on every load unless told to build the model the plain way.
    low_memory = importlib.util.find_spec("accelerate") is not None
    vae = _model_class(name).from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                         low_cpu_mem_usage=low_memory)
    info = _identity(vae, weights)
    if expected_config is not None and dict(expected_config) != info["config"]:
        raise ValueError(f"{folder / CONFIG_NAME} is not the recorded config {dict(expected_config)}")
    model = DiffusersAutoencoder(vae).eval().requires_grad_(False).to(device)
    log.info("first stage: %s %s (downsampling %d, scaling %s)", name, folder, model.downsample_factor,
             info["scaling"])
    return model, info

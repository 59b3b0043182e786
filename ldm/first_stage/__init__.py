"""Adapters that give autoencoders made elsewhere the first-stage API (docs/internals.md).

``ldm.checkpoints.load_first_stage`` stays the one entry point: it dispatches here for a diffusers folder.
"""
from ldm.first_stage.diffusers import (DIFFUSERS_TARGET, DiffusersAutoencoder, diffusers_folder,
                                       load_diffusers_first_stage)
from ldm.first_stage.posterior import PointPosterior

__all__ = ["DIFFUSERS_TARGET", "DiffusersAutoencoder", "PointPosterior", "diffusers_folder",
           "load_diffusers_first_stage"]

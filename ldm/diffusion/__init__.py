"""Diffusion core (no Lightning): schedules, eps/v parameterisation, loss, DDPM/DDIM/DPM-Solver++ samplers, CFG."""
from .guidance import cfg_model
from .loss import diffusion_loss, min_snr_weight
from .parameterization import KINDS, predict_x0_and_eps, q_sample, target
from .samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedules import SCHEDULES, NoiseSchedule, make_schedule, spaced_timesteps

__all__ = [
    "KINDS", "SCHEDULES", "NoiseSchedule", "cfg_model", "diffusion_loss", "make_schedule", "min_snr_weight",
    "predict_x0_and_eps", "q_sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "spaced_timesteps",
    "target",
]

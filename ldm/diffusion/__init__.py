"""Diffusion core (no Lightning): schedules, eps/v parameterisation, loss, DDPM/DDIM/DPM-Solver++ samplers, CFG,
and flow matching (linear interpolant, velocity loss, Euler/Heun/Euler-Maruyama samplers); ``objectives`` holds
either as one object with its loss and samplers."""
from .flow import (FLOW_TIME_SCALE, TIME_DISTRIBUTIONS, TimeSampler, flow_interpolate, flow_loss, flow_network_time,
                   flow_predict_x0_and_eps, flow_target, shift_time)
from .flow_samplers import FLOW_SAMPLERS, flow_time_grid, sample_flow
from .guidance import cfg_model
from .loss import diffusion_loss, min_snr_weight
from .objectives import DDPM, DDPM_SAMPLERS, OBJECTIVES, FlowMatching, make_objective
from .parameterization import KINDS, predict_x0_and_eps, q_sample, target
from .samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedules import SCHEDULES, NoiseSchedule, make_schedule, spaced_timesteps

__all__ = [
    "DDPM", "DDPM_SAMPLERS", "OBJECTIVES", "FlowMatching", "make_objective",
    "FLOW_SAMPLERS", "FLOW_TIME_SCALE", "KINDS", "SCHEDULES", "TIME_DISTRIBUTIONS", "NoiseSchedule", "TimeSampler",
    "cfg_model", "diffusion_loss", "flow_interpolate", "flow_loss", "flow_network_time", "flow_predict_x0_and_eps",
    "flow_target", "flow_time_grid", "make_schedule", "min_snr_weight", "predict_x0_and_eps", "q_sample",
    "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_flow", "shift_time", "spaced_timesteps", "target",
]

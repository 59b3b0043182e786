"""A stage-2 model's training objective as one object: its settings, its loss and its samplers.

``DDPM``: a noise schedule with eps or v prediction (optionally min-SNR weighted), sampled by DDIM, ancestral DDPM
or DPM-Solver++(2M). ``FlowMatching``: the linear path ``x_t = (1 - t) x0 + t eps`` with velocity prediction and a
``TimeSampler``, sampled by Euler, Heun or Euler-Maruyama. ``LatentDiffusion`` holds one and never branches on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .flow import TimeSampler, flow_loss
from .flow_samplers import FLOW_SAMPLERS, sample_flow
from .loss import diffusion_loss
from .samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedules import NoiseSchedule, make_schedule

Cond = Mapping[str, torch.Tensor]
DDPM_SAMPLERS = ("ddim", "ddpm", "dpmpp2m")


@dataclass(frozen=True)
class DDPM:
    schedule: NoiseSchedule
    parameterization: str = "eps"
    min_snr_gamma: float | None = None

    name: ClassVar[str] = "ddpm"
    samplers: ClassVar[tuple[str, ...]] = DDPM_SAMPLERS
    default_sampler: ClassVar[str] = "ddim"

    def loss(self, model: Callable[..., torch.Tensor], z: torch.Tensor, cond: Cond,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return diffusion_loss(model, z, self.schedule, self.parameterization, cond, self.min_snr_gamma,
                              generator=generator)

    def sample(self, model: Callable[..., torch.Tensor], sampler: str, steps: int, eta: float, shift: float,
               guidance_interval: Sequence[float] | None, **kw: Any) -> torch.Tensor:
        """``kw``: shape, seeds, cond, uncond, guidance_scale, device, progress. ``eta``: DDIM's (0: deterministic)."""
        kw.update(steps=steps, schedule=self.schedule, kind=self.parameterization)
        if sampler == "ddim":
            return sample_ddim(model, eta=eta, **kw)
        return (sample_ddpm if sampler == "ddpm" else sample_dpmpp_2m)(model, **kw)


@dataclass(frozen=True)
class FlowMatching:
    time_sampler: TimeSampler

    name: ClassVar[str] = "flow"
    samplers: ClassVar[tuple[str, ...]] = FLOW_SAMPLERS
    default_sampler: ClassVar[str] = "heun"

    def loss(self, model: Callable[..., torch.Tensor], z: torch.Tensor, cond: Cond,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return flow_loss(model, z, cond, time_sampler=self.time_sampler, generator=generator)

    def sample(self, model: Callable[..., torch.Tensor], sampler: str, steps: int, eta: float, shift: float,
               guidance_interval: Sequence[float] | None, **kw: Any) -> torch.Tensor:
        if eta:
            raise ValueError("eta is a DDIM setting; a flow model's stochastic sampler is 'euler_maruyama'")
        return sample_flow(model, sampler=sampler, steps=steps, shift=shift, guidance_interval=guidance_interval,
                           **kw)


OBJECTIVES = {"ddpm": DDPM, "flow": FlowMatching}


def make_objective(name: str = "ddpm", schedule: Mapping | None = None, parameterization: str = "eps",
                   min_snr_gamma: float | None = None, time_sampler: Mapping | None = None) -> DDPM | FlowMatching:
    """The objective ``name`` from the config's settings (those of the other objective are ignored)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    if name == "flow":
        return FlowMatching(TimeSampler(**dict(time_sampler or {})))
    return DDPM(make_schedule(**dict(schedule or {})), parameterization, min_snr_gamma)

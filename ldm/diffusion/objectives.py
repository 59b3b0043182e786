"""A stage-2 model's training objective as one object: its settings, its loss and its samplers.

``DDPM``: a noise schedule with eps or v prediction (optionally min-SNR weighted), sampled by DDIM, ancestral DDPM
or DPM-Solver++(2M). ``FlowMatching``: the linear path ``x_t = (1 - t) x0 + t eps`` with velocity prediction and a
``TimeSampler``, sampled by Euler, Heun or Euler-Maruyama. ``LatentDiffusion`` holds one and never branches on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ldm.registry import Registry

import torch

from .flow import TimeSampler, flow_loss
from .flow_samplers import FLOW_SAMPLERS, sample_flow
from .loss import diffusion_loss
from .samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedules import NoiseSchedule, make_schedule

Cond = Mapping[str, torch.Tensor]


def _ddim(model: Callable[..., torch.Tensor], eta: float, **kw: Any) -> torch.Tensor:
    return sample_ddim(model, eta=eta, **kw)


def _ddpm(model: Callable[..., torch.Tensor], eta: float, **kw: Any) -> torch.Tensor:
    return sample_ddpm(model, **kw)


def _dpmpp_2m(model: Callable[..., torch.Tensor], eta: float, **kw: Any) -> torch.Tensor:
    return sample_dpmpp_2m(model, **kw)


# ``eta`` is DDIM's stochasticity (0: deterministic); the ancestral and DPM-Solver++ samplers have none.
DDPM_SAMPLERS = Registry("DDPM sampler", {"ddim": _ddim, "ddpm": _ddpm, "dpmpp2m": _dpmpp_2m})


@dataclass(frozen=True)
class DDPM:
    schedule: NoiseSchedule
    parameterization: str = "eps"
    min_snr_gamma: float | None = None

    name: ClassVar[str] = "ddpm"
    samplers: ClassVar[Registry] = DDPM_SAMPLERS
    default_sampler: ClassVar[str] = "ddim"

    @classmethod
    def from_settings(cls, schedule: Mapping | None = None, parameterization: str = "eps",
                      min_snr_gamma: float | None = None) -> DDPM:
        return cls(make_schedule(**dict(schedule or {})), parameterization, min_snr_gamma)

    def loss(self, model: Callable[..., torch.Tensor], z: torch.Tensor, cond: Cond,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return diffusion_loss(model, z, self.schedule, self.parameterization, cond, self.min_snr_gamma,
                              generator=generator)

    def sample(self, model: Callable[..., torch.Tensor], sampler: str, steps: int, eta: float, shift: float,
               guidance_interval: Sequence[float] | None, **kw: Any) -> torch.Tensor:
        """``kw``: shape, seeds, cond, uncond, guidance_scale, device, progress. ``eta``: DDIM's (0: deterministic)."""
        return self.samplers[sampler](model, eta, steps=steps, schedule=self.schedule, kind=self.parameterization, **kw)


@dataclass(frozen=True)
class FlowMatching:
    time_sampler: TimeSampler

    name: ClassVar[str] = "flow"
    samplers: ClassVar[Registry] = FLOW_SAMPLERS
    default_sampler: ClassVar[str] = "heun"

    @classmethod
    def from_settings(cls, time_sampler: Mapping | None = None) -> FlowMatching:
        return cls(TimeSampler(**dict(time_sampler or {})))

    def loss(self, model: Callable[..., torch.Tensor], z: torch.Tensor, cond: Cond,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return flow_loss(model, z, cond, time_sampler=self.time_sampler, generator=generator)

    def sample(self, model: Callable[..., torch.Tensor], sampler: str, steps: int, eta: float, shift: float,
               guidance_interval: Sequence[float] | None, **kw: Any) -> torch.Tensor:
        if eta:
            raise ValueError("eta is a DDIM setting; a flow model's stochastic sampler is 'euler_maruyama'")
        return sample_flow(model, sampler=sampler, steps=steps, shift=shift, guidance_interval=guidance_interval,
                           **kw)


OBJECTIVES = Registry("objective", {"ddpm": DDPM, "flow": FlowMatching})
SETTINGS = {"ddpm": ("schedule", "parameterization", "min_snr_gamma"), "flow": ("time_sampler",)}


def make_objective(name: str = "ddpm", **settings: Any) -> DDPM | FlowMatching:
    """The objective ``name`` built from its own settings (``SETTINGS[name]``). A setting of the other objective is
    refused like any unknown key: it would otherwise be read by nothing, and the run would not be what its config
    says."""
    objective = OBJECTIVES[name]
    foreign = sorted(set(settings) - set(SETTINGS[name]))
    if foreign:
        raise ValueError(f"objective={name!r} takes {', '.join(SETTINGS[name])}; {', '.join(foreign)} "
                         f"{'does' if len(foreign) == 1 else 'do'} not apply to it: remove "
                         f"{'it' if len(foreign) == 1 else 'them'} from the config, or set {'it' if len(foreign) == 1 else 'them'} "
                         "to null on the command line")
    return objective.from_settings(**settings)

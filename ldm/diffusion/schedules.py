"""Discrete-time noise schedules (t = 0 .. T-1).

Naming follows diffusers, because the LDM repository's names are misleading:

* ``linear``        — betas = linspace(beta_start, beta_end, T)  (DDPM, Ho et al. 2020).
* ``scaled_linear`` — betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2. This is what the LDM
  repository calls "linear" and what Stable Diffusion uses (beta 0.00085 → 0.012).
* ``cosine``        — Nichol & Dhariwal 2021: alpha_bar(t) = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2),
  s = 0.008, betas = 1 - alpha_bar(t+1)/alpha_bar(t) clipped to 0.999 (beta_start/beta_end unused).

Everything is stored in float64: alpha_bar near 1 and near 0 loses precision in float32, and the
samplers cast the gathered values to the working dtype only at the point of use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


@dataclass(frozen=True)
class NoiseSchedule:
    """betas and alphas_cumprod (float64, shape (T,)) with lookup helpers."""

    betas: torch.Tensor
    name: str = "custom"
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = self.betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar at integer timesteps ``t`` (float64, on t's device)."""
        t = torch.as_tensor(t)
        return self.alphas_cumprod.to(t.device)[t.long()]

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``t`` (float64)."""
        ab = self.alpha_bar(t)
        return ab / (1.0 - ab)


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_schedule(name: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012) -> NoiseSchedule:
    """Build a named schedule (see the module docstring for the exact definitions)."""
    if name == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif name == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    elif name == "cosine":
        betas = _cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown noise schedule '{name}', expected one of {SCHEDULES}")
    return NoiseSchedule(betas=betas, name=name)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """``steps`` timesteps in DEscending order, always starting at t = T-1.

    ``trailing`` (default): t_i = round(T - i·T/steps) - 1, i = 0..steps-1 (ends at T/steps - 1).
    ``linspace``: round(linspace(T-1, 0, steps)) (ends at 0; improved-diffusion's evenly spaced respacing).
    The "leading" spacing of old LDM/diffusers code (0, k, 2k, ...) is deliberately not offered: it never
    visits t = T-1, so sampling starts from a noise level the model was not trained at (diffusers #2585,
    Lin et al. 2024 "Common diffusion noise schedules and sample steps are flawed").
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        t = torch.round(num_timesteps - i * num_timesteps / steps) - 1
    elif spacing == "linspace":
        t = torch.round(torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64))
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}', expected 'trailing' or 'linspace'")
    return t.long()

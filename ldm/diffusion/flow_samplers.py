"""Samplers for velocity models (``ldm.diffusion.flow``): integrate from t = 1 (noise) to t = 0 (data).

ODE (probability flow):  dx = v(x, t) dt.
  ``euler``  first order, one model call per step; its last step x - t·v is exactly the x0 prediction.
  ``heun``   second order (EDM's Algorithm 1): Euler predictor, then the trapezoidal corrector with v at
             t_next; the last step (to t = 0) stays Euler, as in EDM. 2·steps - 1 model calls.
SDE:  ``euler_maruyama`` on the reverse-time SDE with the same marginals as the ODE (SiT, Ma et al. 2024),
    dx = [v(x, t) - D(t)·score(x, t)] dt + sqrt(2·D(t)) dW̄,    D(t) = diffusion_norm · t,
  run backwards in t (i.e. g(t)² = 2·D(t) in dx = [v - g²/2·score] dt + g dW̄). D(t) = t is SiT's
  ``--diffusion-form sigma`` with ``--diffusion-norm 1`` (its defaults; D equals the path's noise coefficient).
  With score = -eps_hat/t, eps_hat = x + (1 - t)·v, the drift needs no division by t:
    v - D·score = v + diffusion_norm·eps_hat,
  so one step from t to t_next = t - h is  x ← x - h·(v + norm·eps_hat) + sqrt(2·norm·t·h)·z.
  The last step (from t = t_1 to 0) is deterministic: the Euler step, i.e. the x0 prediction x - t_1·v. SiT instead
  stops the SDE at t = 0.04 and takes a "Mean" step (drift with the score term, no noise), which over-contracts
  data narrower than that noise level; so this is SiT's SDE, not SiT's sampler step for step.

Time grid: t_i = shift_time(1 - i/steps, shift), i = 0..steps (SD3's shift; shift > 1 spends more steps near
noise). Guidance: classifier-free (``cfg_model``), optionally only while t_lo <= t <= t_hi (guidance interval,
Kynkäänniemi et al. 2024; EDM's sigma interval maps to t = sigma / (1 + sigma)); outside it the conditional
model alone is called. Seeds: as in ``ldm.diffusion.samplers``, every sample owns a CPU generator, so a sample
depends only on its seed (and condition), never on the batch it was drawn in.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from .flow import flow_network_time, shift_time
from .guidance import cfg_model
from .samplers import _progress, _SeededNoise
from ldm.registry import Registry

Cond = Mapping[str, torch.Tensor]


def _euler(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, h: float, velocity: Callable, noise: Callable,
           diffusion_norm: float) -> torch.Tensor:
    return x - h * v


def _heun(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, h: float, velocity: Callable, noise: Callable,
          diffusion_norm: float) -> torch.Tensor:
    x_pred = x - h * v
    return x - 0.5 * h * (v + velocity(x_pred, t_next))


def _euler_maruyama(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, h: float, velocity: Callable,
                    noise: Callable, diffusion_norm: float) -> torch.Tensor:
    # eps_hat = x + (1 - t)·v turns -D·score into + norm·eps_hat
    return x - h * (v + diffusion_norm * (x + (1 - t) * v)) + math.sqrt(2 * diffusion_norm * t * h) * noise()


# One step from t to t_next (h = t - t_next > 0) of each sampler.
FLOW_SAMPLERS = Registry("flow sampler", {"euler": _euler, "heun": _heun, "euler_maruyama": _euler_maruyama})


def flow_time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times (float64) from exactly 1 down to exactly 0, uniform in the unshifted time."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _velocity(model: Callable[..., torch.Tensor], cond: Cond | None, uncond: Cond | None, guidance_scale: float,
              guidance_interval: tuple[float, float] | None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """f(x, t) -> v for a scalar path time t, guided inside the interval (all of [0, 1] by default)."""
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond (e.g. the null label or empty-text context)")
    lo, hi = guidance_interval if guidance_interval is not None else (0.0, 1.0)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {guidance_interval}")
    guided = cfg_model(model, cond or {}, uncond, guidance_scale) if uncond is not None and guidance_scale != 1.0 \
        else None

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), flow_network_time(t), device=x.device, dtype=torch.float32)
        out = guided(x, tt) if guided is not None and lo <= t <= hi else model(x, tt, **(cond or {}))
        return out.to(x.dtype)

    return velocity


@torch.no_grad()
def sample_flow(model: Callable[..., torch.Tensor], shape: Sequence[int], seeds: Sequence[int],
                sampler: str = "euler", steps: int = 50, shift: float = 1.0, cond: Cond | None = None,
                uncond: Cond | None = None, guidance_scale: float = 1.0,
                guidance_interval: tuple[float, float] | None = None, diffusion_norm: float = 1.0,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                progress: bool = False) -> torch.Tensor:
    """x0 of shape (len(seeds), *shape) from a velocity model ``model(x_t, flow_network_time(t), **cond)``.

    ``sampler`` is one of ``FLOW_SAMPLERS`` (module docstring). ``shape`` is ONE sample's shape; ``cond``/``uncond``
    are keyword tensors batched like the samples; guidance is used when ``uncond`` is given and the scale != 1,
    only for t in ``guidance_interval`` when one is given. ``diffusion_norm`` scales the SDE's D(t) (SDE only).
    """
    step = FLOW_SAMPLERS[sampler]  # an unknown name is refused with the known ones
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty (one seed per sample)")
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    velocity = _velocity(model, cond, uncond, guidance_scale, guidance_interval)
    noise = _SeededNoise(seeds, shape, torch.device(device) if device is not None else torch.device("cpu"), dtype)
    ts = flow_time_grid(steps, shift).tolist()
    x = noise()
    for i in _progress(range(steps), progress, f"flow {sampler}"):
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next  # > 0: we integrate backwards in t
        last = i == steps - 1  # the last step of all three is Euler's: x - t·v, the x0 prediction
        x = (_euler if last else step)(x, velocity(x, t), t, t_next, h, velocity, noise, diffusion_norm)
    return x

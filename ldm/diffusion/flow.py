"""Flow matching with the linear interpolant (rectified flow; SiT, SD3): path, velocity target, time sampling, loss.

Convention (SD3's, and the SiT *paper*'s; the SiT *code* runs time the other way): t in [0, 1], t = 0 is data,
t = 1 is noise,
    x_t = (1 - t)·x0 + t·eps,        eps ~ N(0, I),
and the network predicts the velocity dx_t/dt,
    v = eps - x0.
Given v at (x_t, t) the path is inverted exactly:
    x0 = x_t - t·v,    eps = x_t + (1 - t)·v,    score ∇log p_t(x_t) = -E[eps | x_t] / t = -(x_t + (1 - t)·v) / t.

Time seen by the network: ``flow_network_time(t) = 1000·t`` (``FLOW_TIME_SCALE``), as SD3 does. The UNet's and
DiT's sinusoidal embeddings (max period 10000) were designed for DDPM's integer timesteps 0..999; t in [0, 1]
would leave most of their frequencies nearly constant over the whole range. Loss and samplers both apply it,
so a backbone is called as ``model(x_t, 1000·t, **cond)`` with float32 times, never with t itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

FLOW_TIME_SCALE = 1000.0
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def flow_network_time(t: torch.Tensor | float) -> torch.Tensor | float:
    """The time value passed to the network for path time ``t`` in [0, 1]: ``FLOW_TIME_SCALE·t``."""
    return t * FLOW_TIME_SCALE


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample times (B,) shaped (B, 1, ..., 1) in ``like``'s dtype and device."""
    return t.to(like.device, like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def flow_interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·eps for per-sample times ``t`` of shape (B,)."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity regression target v = d x_t / dt = eps - x0 (independent of t for the linear path)."""
    return eps - x0


def flow_predict_x0_and_eps(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) = (x_t - t·v, x_t + (1 - t)·v), in x_t's dtype."""
    v, t = v.to(x_t.dtype), _bcast(t, x_t)
    return x_t - t * v, x_t + (1 - t) * v


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s·t / (1 + (s - 1)·t): s > 1 moves time towards noise, s = 1 is the identity.

    SD3 (Esser et al. 2024) uses it to give an image with s² times as many pixels the noise level (SNR) of the
    base resolution, and samples with s = 3.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class TimeSampler:
    """Training-time distribution of t, then ``shift_time``.

    ``uniform``:       t ~ U[0, 1] (SiT, rectified flow).
    ``logit_normal``:  t = sigmoid(mean + std·z), z ~ N(0, 1) (SD3's "lognorm(0, 1)"; mean > 0 favours noise).
    """

    distribution: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution '{self.distribution}', expected one of {TIME_DISTRIBUTIONS}")
        if not self.std > 0 or not self.shift > 0 or not math.isfinite(self.mean):
            raise ValueError(f"need std > 0, shift > 0 and a finite mean, got {self}")

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` float32 times, drawn on the generator's device (so a seeded generator reproduces them), then moved."""
        draw = generator.device if generator is not None else device
        if self.distribution == "uniform":
            t = torch.rand(n, generator=generator, device=draw)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=draw))
        return shift_time(t, self.shift).to(device if device is not None else t.device)


def flow_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None,
              time_sampler: TimeSampler | None = None, weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Monte-Carlo estimate of the flow-matching loss  E_t[ w(t) · mean_i (v_hat - (eps - x0))_i² ].

    ``model(x_t, flow_network_time(t), **cond)`` predicts v. t (from ``time_sampler``, default uniform) and
    then eps are drawn with ``generator``, on its device, as ``diffusion_loss`` does. ``weight`` maps the
    per-sample t (B,) to per-sample weights (B,). Returns ``(loss, logs)``; ``logs['loss_simple']`` is unweighted.
    """
    time_sampler = time_sampler or TimeSampler()
    b, device = x0.shape[0], x0.device
    draw_device = generator.device if generator is not None else device
    t = time_sampler(b, generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(device)
    out = model(flow_interpolate(x0, eps, t), flow_network_time(t), **(cond or {}))
    per_sample = (out.float() - flow_target(x0, eps).float()).pow(2).flatten(1).mean(1)
    weights = weight(t).to(per_sample) if weight is not None else torch.ones_like(per_sample)
    loss = (weights * per_sample).mean()
    return loss, {"loss": loss.detach(), "loss_simple": per_sample.mean().detach()}

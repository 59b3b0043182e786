"""Forward process and the eps / v parameterisations.

With a = alpha_bar(t):   x_t = sqrt(a)·x0 + sqrt(1-a)·eps                      (q_sample)
eps-prediction target:   eps
v-prediction target:     v = sqrt(a)·eps - sqrt(1-a)·x0                          (Salimans & Ho 2022)
and back:                x0 = sqrt(a)·x_t - sqrt(1-a)·v,  eps = sqrt(1-a)·x_t + sqrt(a)·v.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule

KINDS = ("eps", "v")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown parameterization '{kind}', expected one of {KINDS}")


def _coefs(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(a), sqrt(1-a) at t, shaped (B, 1, ..., 1) to broadcast against ``like``."""
    ab = schedule.alpha_bar(t.to(like.device))
    shape = (-1,) + (1,) * (like.ndim - 1)
    return ab.sqrt().to(like.dtype).reshape(shape), (1.0 - ab).sqrt().to(like.dtype).reshape(shape)


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Noise ``x0`` to level ``t``: sqrt(a)·x0 + sqrt(1-a)·eps."""
    sa, s1a = _coefs(schedule, t, x0)
    return sa * x0 + s1a * eps


def target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
           kind: str = "eps") -> torch.Tensor:
    """The regression target of the network for parameterisation ``kind``."""
    _check_kind(kind)
    if kind == "eps":
        return eps
    sa, s1a = _coefs(schedule, t, x0)
    return sa * eps - s1a * x0


def predict_x0_and_eps(model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                       kind: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output into (x0_hat, eps_hat), in x_t's dtype."""
    _check_kind(kind)
    out = model_out.to(x_t.dtype)
    sa, s1a = _coefs(schedule, t, x_t)
    if kind == "eps":
        return (x_t - s1a * out) / sa, out
    return sa * x_t - s1a * out, s1a * x_t + sa * out

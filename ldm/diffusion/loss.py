"""Training loss: uniform t, MSE on the parameterisation's target, optional min-SNR-γ weighting.

Min-SNR-γ (Hang et al. 2023) weights the x0-space error by min(SNR, γ). Since, per sample,
    ||eps_hat - eps||² = SNR · ||x0_hat - x0||²    and    ||v_hat - v||² = (SNR + 1) · ||x0_hat - x0||²,
the same objective on the network's own target needs the weight
    eps:  w = min(SNR, γ) / SNR            v:  w = min(SNR, γ) / (SNR + 1).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .parameterization import _check_kind, q_sample, target
from .schedules import NoiseSchedule


def min_snr_weight(snr: torch.Tensor, gamma: float, kind: str = "eps") -> torch.Tensor:
    """Per-sample min-SNR-γ weight for a loss on the ``kind`` target (formula in the module docstring)."""
    _check_kind(kind)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if kind == "eps" else clipped / (snr + 1.0)


def diffusion_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, schedule: NoiseSchedule,
                   kind: str = "eps", cond: Mapping[str, torch.Tensor] | None = None,
                   min_snr_gamma: float | None = None, generator: torch.Generator | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Monte-Carlo estimate of the denoising loss for a batch ``x0``.

    ``model(x_t, t, **cond)`` must return the ``kind`` prediction. ``t`` and the noise are drawn with
    ``generator`` (on the generator's device, then moved), so a seeded generator reproduces the draw.
    Returns ``(loss, logs)``; ``logs['loss_simple']`` is the unweighted MSE.
    """
    b, device = x0.shape[0], x0.device
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=draw_device).to(device)
    eps = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(device)
    out = model(q_sample(x0, t, eps, schedule), t, **(cond or {}))
    per_sample = (out.float() - target(x0, eps, t, schedule, kind).float()).pow(2).flatten(1).mean(1)
    weights = torch.ones_like(per_sample)
    if min_snr_gamma is not None:
        weights = min_snr_weight(schedule.snr(t), min_snr_gamma, kind).to(per_sample.dtype)
    loss = (weights * per_sample).mean()
    logs = {"loss": loss.detach(), "loss_simple": per_sample.mean().detach()}
    return loss, logs

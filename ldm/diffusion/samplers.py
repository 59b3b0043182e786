"""DDPM, DDIM and DPM-Solver++(2M) samplers over any callable ``model(x_t, t, **cond) -> eps or v``.

Reproducibility: every sample owns a ``torch.Generator`` seeded with its seed; its initial noise and
every per-step noise are drawn from that generator alone (on the CPU, in float32) and then stacked and
moved to the device. A sample therefore depends only on its seed — not on batch size, batch
composition, number of processes or device (EDM2-style ``--seeds``).

Timesteps: ``steps`` < T visits a subset of the training timesteps (``spaced_timesteps``, default
"trailing", always starting at t = T-1). DDPM then uses the respaced betas
beta'_k = 1 - alpha_bar(t_k) / alpha_bar(t_{k-1}) of improved-diffusion, so the short chain is itself a
valid DDPM; the last step goes to alpha_bar = 1, i.e. returns the x0 prediction.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from .guidance import cfg_model
from .parameterization import predict_x0_and_eps
from .schedules import NoiseSchedule, spaced_timesteps

Cond = Mapping[str, torch.Tensor]


class _SeededNoise:
    """Per-sample noise source: one CPU generator per seed."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device, dtype: torch.dtype):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device, self.dtype = tuple(shape), device, dtype

    def __call__(self) -> torch.Tensor:
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(self.device, self.dtype)


def _denoiser(model: Callable[..., torch.Tensor], cond: Cond | None, uncond: Cond | None,
              guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond (e.g. the null label or empty-text context)")
    if uncond is not None and guidance_scale != 1.0:
        return cfg_model(model, cond or {}, uncond, guidance_scale)
    return lambda x, t: model(x, t, **(cond or {}))


def _setup(shape: Sequence[int], seeds: Sequence[int], schedule: NoiseSchedule, steps: int, spacing: str,
           device: torch.device | str | None, dtype: torch.dtype):
    """Timesteps (descending), alpha_bar at them and at the next (smaller) one, the noise source."""
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty (one seed per sample)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    ts = spaced_timesteps(schedule.num_timesteps, steps, spacing)
    ab = schedule.alphas_cumprod[ts]
    ab_prev = torch.cat([ab[1:], ab.new_ones(1)])  # the final step lands on alpha_bar = 1 (clean data)
    return ts, ab.tolist(), ab_prev.tolist(), _SeededNoise(seeds, shape, device, dtype)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def sample_ddpm(model: Callable[..., torch.Tensor], shape: Sequence[int], seeds: Sequence[int],
                schedule: NoiseSchedule, kind: str = "eps", steps: int | None = None, cond: Cond | None = None,
                uncond: Cond | None = None, guidance_scale: float = 1.0, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, progress: bool = False, spacing: str = "trailing") -> torch.Tensor:
    """Ancestral sampling with the posterior variance beta~ ("fixed small"); returns x0 of shape (len(seeds), *shape).

    ``shape`` is the shape of ONE sample, e.g. (4, 32, 32). ``cond``/``uncond`` are keyword tensors for
    the model, batched like the samples; guidance is used when ``uncond`` is given and the scale != 1.
    """
    steps = steps or schedule.num_timesteps
    ts, ab, ab_prev, noise = _setup(shape, seeds, schedule, steps, spacing, device, dtype)
    denoise = _denoiser(model, cond, uncond, guidance_scale)
    x = noise()
    for i in _progress(range(steps), progress, "DDPM"):
        t = torch.full((x.shape[0],), int(ts[i]), device=x.device, dtype=torch.long)
        x0, _ = predict_x0_and_eps(denoise(x, t), x, t, schedule, kind)
        a, ap = ab[i], ab_prev[i]
        beta = 1.0 - a / ap
        # Posterior q(x_prev | x_t, x0) of the (respaced) forward chain.
        mean = (math.sqrt(ap) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - ap) / (1 - a)) * x
        x = mean + math.sqrt(beta * (1 - ap) / (1 - a)) * noise() if i < steps - 1 else mean
    return x


@torch.no_grad()
def sample_ddim(model: Callable[..., torch.Tensor], shape: Sequence[int], seeds: Sequence[int],
                schedule: NoiseSchedule, kind: str = "eps", steps: int = 50, eta: float = 0.0,
                cond: Cond | None = None, uncond: Cond | None = None, guidance_scale: float = 1.0,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                progress: bool = False, spacing: str = "trailing") -> torch.Tensor:
    """DDIM (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's posterior variance.

    Arguments as in ``sample_ddpm``; returns x0 of shape (len(seeds), *shape).
    """
    ts, ab, ab_prev, noise = _setup(shape, seeds, schedule, steps, spacing, device, dtype)
    denoise = _denoiser(model, cond, uncond, guidance_scale)
    x = noise()
    for i in _progress(range(steps), progress, "DDIM"):
        t = torch.full((x.shape[0],), int(ts[i]), device=x.device, dtype=torch.long)
        x0, eps = predict_x0_and_eps(denoise(x, t), x, t, schedule, kind)
        a, ap = ab[i], ab_prev[i]
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        x = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise()
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable[..., torch.Tensor], shape: Sequence[int], seeds: Sequence[int],
                    schedule: NoiseSchedule, kind: str = "eps", steps: int = 20, cond: Cond | None = None,
                    uncond: Cond | None = None, guidance_scale: float = 1.0, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, progress: bool = False,
                    spacing: str = "trailing") -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the probability-flow ODE solved in log-SNR with the x0 prediction,
    second order from the previous step's x0; deterministic. The first step is first order (= DDIM with
    eta 0), and the last lands on the x0 prediction, as DDIM's does. Fewer steps than DDIM for the same
    accuracy; arguments as in ``sample_ddpm``.
    """
    ts, ab, ab_prev, noise = _setup(shape, seeds, schedule, steps, spacing, device, dtype)
    denoise = _denoiser(model, cond, uncond, guidance_scale)
    x = noise()
    x0_prev, h_prev = None, None
    for i in _progress(range(steps), progress, "DPM-Solver++(2M)"):
        t = torch.full((x.shape[0],), int(ts[i]), device=x.device, dtype=torch.long)
        x0, _ = predict_x0_and_eps(denoise(x, t), x, t, schedule, kind)
        a, ap = ab[i], ab_prev[i]
        if ap >= 1.0:  # alpha_bar = 1 (log-SNR = inf): clean data, i.e. the x0 prediction
            return x0
        h = 0.5 * (math.log(ap / (1 - ap)) - math.log(a / (1 - a)))  # step in log-SNR/2 (lambda)
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = math.sqrt((1 - ap) / (1 - a)) * x - math.sqrt(ap) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


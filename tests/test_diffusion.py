"""Diffusion core against closed forms.

Gaussian data x0 ~ N(mu, sigma^2) (per channel, elements independent). With a = alpha_bar(t),
x_t = sqrt(a) x0 + sqrt(1-a) eps is jointly Gaussian with (x0, eps):
    Var(x_t) = D := a sigma^2 + 1 - a,   Cov(eps, x_t) = sqrt(1-a),   Cov(x0, x_t) = sqrt(a) sigma^2, so
    E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / D
    E[x0  | x_t] = mu + sqrt(a) sigma^2 (x_t - sqrt(a) mu) / D
    E[v   | x_t] = sqrt(a) E[eps|x_t] - sqrt(1-a) E[x0|x_t]
                 = sqrt(1-a) ( sqrt(a) (1 - sigma^2) (x_t - sqrt(a) mu) / D - mu ).
These are the exact MMSE predictors, i.e. a perfectly trained network.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import (KINDS, SCHEDULES, cfg_model, diffusion_loss, make_schedule, min_snr_weight,
                           predict_x0_and_eps, q_sample, sample_ddim, sample_ddpm, sample_dpmpp_2m, spaced_timesteps,
                           target)

MU = torch.tensor([0.5, 0.0, -0.4, 0.2], dtype=torch.float64)
SIGMA = torch.tensor([0.6, 1.0, 0.8, 1.2], dtype=torch.float64)
SAMPLE_SHAPE = (4, 32, 32)   # one "sample" = 4 channels × 1024 i.i.d. elements
SEEDS = list(range(8))       # → 8192 draws per channel
N = len(SEEDS) * 32 * 32


def analytic_model(schedule, kind: str):
    """Exact E[eps|x_t] or E[v|x_t] for the Gaussian data above (formulas in the module docstring)."""
    mu, sigma = MU.float().view(1, 4, 1, 1), SIGMA.float().view(1, 4, 1, 1)

    def model(x, t):
        a = schedule.alpha_bar(t).float().view(-1, 1, 1, 1)
        centred = (x - a.sqrt() * mu) / (a * sigma ** 2 + 1 - a)
        if kind == "eps":
            return (1 - a).sqrt() * centred
        return (1 - a).sqrt() * (a.sqrt() * (1 - sigma ** 2) * centred - mu)

    return model


def chain_law(schedule, steps: int, eta: float):
    """Exact per-channel mean/std of the output of a DDIM(eta) chain driven by the exact predictor.

    Every step is affine in x plus independent Gaussian noise, so N(m, v) is propagated exactly:
    x0_hat = p + q x, eps_hat = (x - sqrt(a) x0_hat)/sqrt(1-a),
    x' = sqrt(a') x0_hat + sqrt(1 - a' - s^2) eps_hat + s z, s = eta sqrt((1-a')/(1-a)) sqrt(1 - a/a').
    DDIM with eta = 1 is the DDPM ancestral step with variance beta~ (Song et al. 2021, eq. 16), so this
    is also the reference for sample_ddpm.
    """
    m, v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ts = spaced_timesteps(schedule.num_timesteps, steps).tolist()
    abar = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        a = abar[t].item()
        ap = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        d = a * SIGMA ** 2 + 1 - a
        q = math.sqrt(a) * SIGMA ** 2 / d
        p = MU - math.sqrt(a) * MU * q
        s = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        k = math.sqrt(max(1 - ap - s * s, 0.0)) / math.sqrt(1 - a)
        coef_x = math.sqrt(ap) * q + k * (1 - math.sqrt(a) * q)   # d x' / d x
        const = math.sqrt(ap) * p - k * math.sqrt(a) * p
        m, v = coef_x * m + const, coef_x ** 2 * v + s * s
    return m, v.sqrt()


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(4, -1)
    return flat.mean(1), flat.std(1)


SAMPLERS = {
    "ddpm": (1.0, lambda m, s, k, n: sample_ddpm(m, SAMPLE_SHAPE, SEEDS, s, k, steps=n)),
    "ddim_eta0": (0.0, lambda m, s, k, n: sample_ddim(m, SAMPLE_SHAPE, SEEDS, s, k, steps=n, eta=0.0)),
    "ddim_eta1": (1.0, lambda m, s, k, n: sample_ddim(m, SAMPLE_SHAPE, SEEDS, s, k, steps=n, eta=1.0)),
}


@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_samplers_reproduce_gaussian_data(schedule_name):
    """Sample moments vs (a) the exact law of the discretised chain, tight: 4 standard errors;
    (b) the data (mu, sigma): 0.05 abs + 4 SE. Exception, stated: the stochastic samplers at 50 steps
    use beta~ ("fixed small") variances, which under-disperse short chains (Bao et al. 2022,
    Analytic-DPM); for them std may be low by up to 0.1 (the exact chain law says ~0.085 for sigma=1.2)."""
    schedule = make_schedule(schedule_name)
    se_mean, se_std = 4 * SIGMA / math.sqrt(N), 4 * SIGMA / math.sqrt(2 * N)
    for kind in KINDS:
        model = analytic_model(schedule, kind)
        for steps in (50, 1000):
            for name, (eta, run) in SAMPLERS.items():
                mean, std = channel_moments(run(model, schedule, kind, steps))
                law_mean, law_std = chain_law(schedule, steps, eta)
                where = f"{schedule_name}/{kind}/{name}/{steps} steps"
                assert torch.all((mean - law_mean).abs() <= se_mean + 1e-3), where
                assert torch.all((std - law_std).abs() <= se_std + 1e-3), where
                std_tol = 0.1 if (eta > 0 and steps == 50) else 0.05
                assert torch.all((mean - MU).abs() <= 0.05 + se_mean), where
                assert torch.all((std - SIGMA).abs() <= std_tol + se_std), where


@pytest.mark.parametrize("kind", KINDS)
def test_dpmpp_2m_solves_the_ode_more_accurately_than_ddim(kind):
    """Both are deterministic solvers of the same probability-flow ODE from the same initial noise; DDIM with
    1000 steps is the reference. The second-order DPM-Solver++(2M) lands closer to it than first-order DDIM,
    increasingly so with more steps (measured ratios 0.47 / 0.34 / 0.25), and its moments match the data."""
    schedule = make_schedule("scaled_linear")
    model = analytic_model(schedule, kind)
    reference = sample_ddim(model, SAMPLE_SHAPE, SEEDS, schedule, kind, steps=1000)
    for steps, ratio in ((10, 0.6), (20, 0.45), (50, 0.35)):
        ddim = sample_ddim(model, SAMPLE_SHAPE, SEEDS, schedule, kind, steps=steps)
        dpm = sample_dpmpp_2m(model, SAMPLE_SHAPE, SEEDS, schedule, kind, steps=steps)
        assert (dpm - reference).norm() < ratio * (ddim - reference).norm(), steps
    mean, std = channel_moments(dpm)
    assert torch.all((mean - MU).abs() <= 0.05 + 4 * SIGMA / math.sqrt(N))
    assert torch.all((std - SIGMA).abs() <= 0.05 + 4 * SIGMA / math.sqrt(2 * N))
    # One step: first order, i.e. DDIM's step (from t = T-1 straight to the x0 prediction).
    torch.testing.assert_close(sample_dpmpp_2m(model, SAMPLE_SHAPE, SEEDS, schedule, kind, steps=1),
                               sample_ddim(model, SAMPLE_SHAPE, SEEDS, schedule, kind, steps=1))


def test_ddim_eta1_equals_ddpm_step():
    schedule = make_schedule("scaled_linear")
    model = analytic_model(schedule, "eps")
    a = sample_ddpm(model, (4, 4, 4), [5, 6], schedule, steps=20)
    b = sample_ddim(model, (4, 4, 4), [5, 6], schedule, steps=20, eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_samples_depend_only_on_their_seed(sampler):
    schedule = make_schedule("cosine")
    model = analytic_model(schedule, "v")
    run = {"ddpm": lambda seeds: sample_ddpm(model, (4, 8, 8), seeds, schedule, "v", steps=25),
           "ddim": lambda seeds: sample_ddim(model, (4, 8, 8), seeds, schedule, "v", steps=25, eta=1.0),
           "dpmpp2m": lambda seeds: sample_dpmpp_2m(model, (4, 8, 8), seeds, schedule, "v", steps=25)}[sampler]
    together = run(list(range(8)))
    one_by_one = torch.cat([run([s]) for s in range(8)])
    assert torch.equal(together, one_by_one)
    assert torch.equal(run([3, 1]), together[[3, 1]])
    assert not torch.allclose(together[0], together[1])


def test_timestep_spacing():
    assert spaced_timesteps(1000, 50).tolist() == list(range(999, 0, -20))   # trailing: 999, 979, ..., 19
    assert spaced_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    linspace = spaced_timesteps(1000, 4, "linspace").tolist()
    assert linspace == [999, 666, 333, 0]


def test_schedules_match_definitions():
    lin = make_schedule("linear", 1000, 1e-4, 0.02)
    torch.testing.assert_close(lin.betas[[0, 500, 999]], torch.tensor([1e-4, 1e-4 + 500 * (0.02 - 1e-4) / 999, 0.02],
                                                                       dtype=torch.float64))
    sd = make_schedule("scaled_linear")
    # Stable Diffusion's schedule: terminal sqrt(alpha_bar) = 0.068265 (Lin et al. 2024, Table 1).
    assert abs(sd.alphas_cumprod[-1].sqrt().item() - 0.068265) < 1e-5
    cos = make_schedule("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert abs(cos.alpha_bar(t).item() - f(t + 1) / f(0)) < 1e-10
    assert cos.betas.max().item() == pytest.approx(0.999)
    assert sd.snr(10).item() == pytest.approx(sd.alpha_bar(10).item() / (1 - sd.alpha_bar(10).item()))


@pytest.mark.parametrize("kind", KINDS)
def test_q_sample_target_round_trip(kind):
    schedule = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    x_t = q_sample(x0, t, eps, schedule)
    a = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    expected = eps if kind == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
    tgt = target(x0, eps, t, schedule, kind)
    torch.testing.assert_close(tgt, expected)
    x0_hat, eps_hat = predict_x0_and_eps(tgt, x_t, t, schedule, kind)
    # eps→x0 divides by sqrt(a_T) ~ 1e-4 on the cosine schedule, hence the loose atol there.
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_hat[:-1], x0[:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_min_snr_weight_matches_x0_space_objective(kind):
    """w · ||target error||² must equal min(SNR, γ) · ||x0 error||² (Hang et al. 2023)."""
    schedule, gamma = make_schedule("scaled_linear"), 5.0
    t = torch.tensor([0, 50, 200, 400, 999])
    snr = schedule.snr(t)
    ref = [min(s, gamma) / (s if kind == "eps" else s + 1) for s in snr.tolist()]
    torch.testing.assert_close(min_snr_weight(snr, gamma, kind), torch.tensor(ref, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = q_sample(x0, t, eps, schedule)
    err_target = (out - target(x0, eps, t, schedule, kind)).pow(2).flatten(1).sum(1)
    err_x0 = (predict_x0_and_eps(out, x_t, t, schedule, kind)[0] - x0).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(min_snr_weight(snr, gamma, kind) * err_target, snr.clamp(max=gamma) * err_x0)


def test_diffusion_loss_reproducible_and_weighted():
    schedule = make_schedule("linear")
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.5 * x  # noqa: E731
    loss, logs = diffusion_loss(model, x0, schedule, "eps", generator=torch.Generator().manual_seed(3))
    # Independent recomputation with the same draws (t first, then eps).
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (16,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    ref = (0.5 * (a.sqrt() * x0 + (1 - a).sqrt() * eps) - eps).pow(2).mean()
    torch.testing.assert_close(loss, ref)
    assert logs["loss_simple"] == pytest.approx(loss.item())
    # γ above every SNR: eps weights are exactly 1; v weights are SNR/(SNR+1) < 1.
    big = float(schedule.snr(0)) + 1
    loss_w, _ = diffusion_loss(model, x0, schedule, "eps", min_snr_gamma=big, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_w, loss)
    loss_v, logs_v = diffusion_loss(model, x0, schedule, "v", min_snr_gamma=big, generator=torch.Generator().manual_seed(3))
    assert loss_v < logs_v["loss_simple"]


class CountingModel:
    """f(x, t, y) = x·(1 + y) + t/1000, recording batch sizes of calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(x.shape[0])
        return x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1).float() / 1000


def test_cfg_identities():
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([1, 500, 999])
    cond, uncond = {"y": torch.tensor([1, 2, 3])}, {"y": torch.tensor([9, 9, 9])}
    m = CountingModel()
    c, u = m(x, t, **cond), m(x, t, **uncond)
    m.calls.clear()
    torch.testing.assert_close(cfg_model(m, cond, uncond, 1.0)(x, t), c)
    torch.testing.assert_close(cfg_model(m, cond, uncond, 0.0)(x, t), u)
    torch.testing.assert_close(cfg_model(m, cond, uncond, 4.0)(x, t), u + 4.0 * (c - u))
    assert m.calls == [6, 6, 6]  # one batched forward per call


def test_sampler_with_guidance_scale_one_equals_conditional():
    schedule = make_schedule("scaled_linear")
    base = analytic_model(schedule, "eps")
    model = lambda x, t, y: base(x, t) + 0.1 * y.view(-1, 1, 1, 1)  # noqa: E731
    cond, uncond = {"y": torch.ones(2)}, {"y": torch.zeros(2)}
    plain = sample_ddim(model, (4, 4, 4), [0, 1], schedule, steps=10, cond=cond)
    guided = sample_ddim(model, (4, 4, 4), [0, 1], schedule, steps=10, cond=cond, uncond=uncond, guidance_scale=1.0)
    unc = sample_ddim(model, (4, 4, 4), [0, 1], schedule, steps=10, cond=uncond)
    zero = sample_ddim(model, (4, 4, 4), [0, 1], schedule, steps=10, cond=cond, uncond=uncond, guidance_scale=0.0)
    torch.testing.assert_close(guided, plain)
    torch.testing.assert_close(zero, unc, atol=1e-5, rtol=1e-5)


def test_guidance_without_uncond_is_an_error():
    schedule = make_schedule("linear")
    with pytest.raises(ValueError, match="uncond"):
        sample_ddim(analytic_model(schedule, "eps"), (4, 2, 2), [0], schedule, steps=2, guidance_scale=3.0)

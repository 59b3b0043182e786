"""Flow matching against closed forms.

Gaussian data x0 ~ N(mu, s^2) per channel (elements independent). With x_t = (1-t) x0 + t eps, (x0, eps, x_t)
are jointly Gaussian:
    E[x_t] = (1-t) mu,   D(t) := Var(x_t) = (1-t)^2 s^2 + t^2,   Cov(x0, x_t) = (1-t) s^2,   Cov(eps, x_t) = t,
so the exact (MMSE) velocity E[eps - x0 | x_t] is affine in x_t:
    v*(x, t) = A(t) x + B(t),   A = (t - (1-t) s^2) / D,   B = -mu - A (1-t) mu,
and the minimum of the loss at time t is Var(eps - x0 | x_t) = (1 + s^2) - (t - (1-t) s^2)^2 / D = s^2 / D.
The probability-flow ODE keeps the standardised coordinate: x_t = (1-t) mu + sqrt(D(t)) eps, so the ODE started
at x_1 = eps ends at x_0 = mu + s eps exactly. Every sampler step with v* is affine in x (plus independent Gaussian
noise for the SDE), so the exact law of each discretised chain is propagated below in closed form (``chain_law``):
samples are checked against it tightly, and against the data within the stated discretisation tolerances.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import (FLOW_SAMPLERS, FLOW_TIME_SCALE, TimeSampler, flow_interpolate, flow_loss,
                           flow_network_time, flow_predict_x0_and_eps, flow_target, flow_time_grid, sample_flow,
                           shift_time)

MU = torch.tensor([0.5, -1.0, 0.0, 0.3], dtype=torch.float64)
S = torch.tensor([0.05, 0.3, 1.0, 2.0], dtype=torch.float64)   # 0.05: narrower than the last step at 20 steps
SAMPLE_SHAPE = (4, 32, 32)   # one sample = 4 channels x 1024 i.i.d. elements
SEEDS = list(range(8))       # -> 8192 draws per channel
N = len(SEEDS) * 32 * 32


def coefficients(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (A, B) with v*(x, t) = A x + B (module docstring)."""
    d = (1 - t) ** 2 * S ** 2 + t ** 2
    a = (t - (1 - t) * S ** 2) / d
    return a, -MU - a * (1 - t) * MU


def oracle(x: torch.Tensor, t_net: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The exact velocity; takes the NETWORK time 1000 t, so a sampler passing t itself fails. ``y`` shifts it."""
    t = (t_net.double() / FLOW_TIME_SCALE).view(-1, 1, 1, 1)
    mu, s = MU.view(1, 4, 1, 1), S.view(1, 4, 1, 1)
    v = -mu + (t - (1 - t) * s ** 2) * (x.double() - (1 - t) * mu) / ((1 - t) ** 2 * s ** 2 + t ** 2)
    if y is not None:
        v = v + 0.1 * y.double().view(-1, 1, 1, 1)
    return v.to(x.dtype)


def chain_law(sampler: str, steps: int, shift: float = 1.0):
    """Exact per-channel law of the chain's output: x = k eps + c (+ Gaussian noise); returns (k, c, mean, std)."""
    k, c = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    m, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ts = flow_time_grid(steps, shift).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next
        a0, b0 = coefficients(t)
        q = 0.0
        if sampler == "euler" or i == steps - 1:
            a, b = 1 - h * a0, -h * b0
        elif sampler == "heun":
            a1, b1 = coefficients(t_next)
            a_pred, b_pred = 1 - h * a0, -h * b0
            a, b = 1 - 0.5 * h * (a0 + a1 * a_pred), -0.5 * h * (b0 + a1 * b_pred + b1)
        else:  # Euler-Maruyama, D(t) = t: x - h (v + eps_hat) + sqrt(2 t h) z, eps_hat = x + (1-t) v
            a, b, q = 1 - h * (a0 + 1 + (1 - t) * a0), -h * (b0 + (1 - t) * b0), 2 * t * h
        k, c, m, var = a * k, a * c + b, a * m + b, a * a * var + q
    return k, c, m, var.sqrt()


def seed_noise(seeds) -> torch.Tensor:
    """The initial noise of each seed, drawn independently of the sampler (the convention: first draw, CPU, fp32)."""
    return torch.stack([torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(4, -1)
    return flat.mean(1), flat.std(1)


def per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, 4, 1, 1)


# Systematic error allowed on the std, |std - s| <= r s + a (plus 4 standard errors of the sample std), from the
# exact chain laws (measured, rel. error on s = 0.05 / 0.3 / 1 / 2):
#   euler  1000: -.008 -.002 -.001 -.002   50: -.16 -.038 -.025 -.029   20: -.36 -.092 -.062 -.072
#   heun   1000:  .000  .000  .000  .000   50: -.060 -.002 .000 .000     20: -.29 -.011 -.001 -.002
#   EM     1000:  .000 -.000 -.001 -.001   50: +.023 -.006 -.012 -.020   20: +.030 -.010 -.028 -.047
# ``a`` covers the narrow channel (s = 0.05 ~ the last step 1/steps; every sampler's last step is Euler there).
# The mean is exact for every chain (v* is affine and E[v*] = -mu along the path): only sampling error allowed.
STD_TOL = {("euler", 1000): (0.005, 0.001), ("euler", 50): (0.04, 0.01), ("euler", 20): (0.10, 0.02),
           ("heun", 1000): (0.002, 0.001), ("heun", 50): (0.005, 0.004), ("heun", 20): (0.015, 0.015),
           ("euler_maruyama", 1000): (0.005, 0.001), ("euler_maruyama", 50): (0.025, 0.002),
           ("euler_maruyama", 20): (0.05, 0.002)}


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_samplers_reproduce_gaussian_data(sampler):
    se_mean, se_std = 4 * S / math.sqrt(N), 4 * S / math.sqrt(2 * N)
    eps = seed_noise(SEEDS)
    for steps in (1000, 50, 20):
        x = sample_flow(oracle, SAMPLE_SHAPE, SEEDS, sampler, steps)
        mean, std = channel_moments(x)
        k, c, law_mean, law_std = chain_law(sampler, steps)
        where = f"{sampler}/{steps} steps"
        if sampler == "euler_maruyama":  # the chain's exact law: 4 standard errors
            assert torch.all((mean - law_mean).abs() <= 4 * law_std / math.sqrt(N)), where
            assert torch.all((std - law_std).abs() <= 4 * law_std / math.sqrt(2 * N)), where
        else:  # deterministic: the exact affine map of each sample's own noise (measured max error 1.5e-5)
            torch.testing.assert_close(x.double(), per_channel(k) * eps + per_channel(c), atol=1e-4, rtol=0, msg=where)
        r, a = STD_TOL[(sampler, steps)]
        assert torch.all((mean - MU).abs() <= se_mean + 1e-3), where
        assert torch.all((std - S).abs() <= r * S + a + se_std), where


def test_ode_reaches_the_closed_form_solution_and_heun_beats_euler():
    """ODE from x_1 = eps ends at mu + s eps. Heun at 1000 steps: max error 3e-5 measured (tolerance 1e-4);
    Euler is first order: 0.011 measured at 1000 steps (tolerance 0.02). At 20 steps Heun's error norm is
    0.096 of Euler's (tolerance 0.15), and 0.02-0.12 of it on the channels wider than the last step."""
    exact = per_channel(MU) + per_channel(S) * seed_noise(SEEDS)
    heun = sample_flow(oracle, SAMPLE_SHAPE, SEEDS, "heun", 1000).double()
    euler = sample_flow(oracle, SAMPLE_SHAPE, SEEDS, "euler", 1000).double()
    assert (heun - exact).abs().max() < 1e-4
    assert (euler - exact).abs().max() < 0.02
    heun20 = sample_flow(oracle, SAMPLE_SHAPE, SEEDS, "heun", 20).double() - exact
    euler20 = sample_flow(oracle, SAMPLE_SHAPE, SEEDS, "euler", 20).double() - exact
    assert heun20.norm() < 0.15 * euler20.norm()
    per_ch = heun20.pow(2).sum((0, 2, 3)).sqrt() / euler20.pow(2).sum((0, 2, 3)).sqrt()
    assert torch.all(per_ch[1:] < 0.15), per_ch


@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_shifted_grid(sampler):
    grid = flow_time_grid(10, 3.0)
    u = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(grid, 3 * u / (1 + 2 * u))
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and bool((grid.diff() < 0).all())
    torch.testing.assert_close(flow_time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    # The samplers walk the shifted grid: still the exact chain.
    k, c, _, _ = chain_law(sampler, 50, shift=3.0)
    x = sample_flow(oracle, SAMPLE_SHAPE, SEEDS[:2], sampler, 50, shift=3.0).double()
    torch.testing.assert_close(x, per_channel(k) * seed_noise(SEEDS[:2]) + per_channel(c), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ path, loss, time sampling
def test_path_target_and_inversion():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = flow_interpolate(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])   # t = 0 is data
    torch.testing.assert_close(x_t[-1], eps[-1])  # t = 1 is noise
    torch.testing.assert_close(flow_target(x0, eps), eps - x0)
    # The target is the path's time derivative.
    dt = 1e-4
    fd = (flow_interpolate(x0, eps, t + dt) - flow_interpolate(x0, eps, t - dt)) / (2 * dt)
    torch.testing.assert_close(fd, flow_target(x0, eps))
    x0_hat, eps_hat = flow_predict_x0_and_eps(flow_target(x0, eps), x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    assert FLOW_TIME_SCALE == 1000.0 and flow_network_time(0.25) == 250.0


def test_flow_loss_draws_and_network_time():
    """Independent recomputation with the same draws (t first, then eps) and the network seeing 1000 t."""
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(x, t_net):
        seen.append(t_net)
        return 0.5 * x

    sampler = TimeSampler("logit_normal", 0.3, 0.7)
    loss, logs = flow_loss(model, x0, time_sampler=sampler, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.sigmoid(0.3 + 0.7 * torch.randn(16, generator=g))
    eps = torch.randn(x0.shape, generator=g)
    tb = t.view(-1, 1, 1, 1)
    ref = (0.5 * ((1 - tb) * x0 + tb * eps) - (eps - x0)).pow(2).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(seen[0], 1000 * t)
    assert logs["loss_simple"] == pytest.approx(loss.item())
    weighted, logs_w = flow_loss(model, x0, time_sampler=sampler, weight=lambda t: 2 * t,
                                 generator=torch.Generator().manual_seed(3))
    per_sample = (0.5 * ((1 - tb) * x0 + tb * eps) - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, (2 * t * per_sample).mean())
    torch.testing.assert_close(logs_w["loss_simple"], loss)


def test_exact_velocity_minimises_the_loss():
    """At v*, the expected loss is E_t mean_c s_c^2 / D_c(t) (module docstring; quadrature: 0.5155, 3% tolerance
    for the Monte-Carlo estimate), and any perturbation of v* raises it."""
    g = torch.Generator().manual_seed(11)
    x0 = per_channel(MU).float() + per_channel(S).float() * torch.randn(4096, 4, 8, 8, generator=g)
    u = torch.linspace(0, 1, 200001, dtype=torch.float64).view(-1, 1)
    expected = torch.trapezoid((S ** 2 / ((1 - u) ** 2 * S ** 2 + u ** 2)).mean(1), u.squeeze(1)).item()

    def loss_of(model):
        return flow_loss(model, x0, generator=torch.Generator().manual_seed(5))[0].item()

    best = loss_of(oracle)
    assert best == pytest.approx(expected, rel=0.03)
    for perturbed in (lambda x, t: oracle(x, t) + 0.05, lambda x, t: 1.05 * oracle(x, t),
                      lambda x, t: oracle(x, t) + 0.05 * x, lambda x, t: oracle(x, 0.9 * t)):
        assert loss_of(perturbed) > best + 1e-4


def test_time_samplers():
    n = 200_000
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    uni = TimeSampler()(n, g())
    assert uni.dtype == torch.float32 and 0 <= uni.min() and uni.max() <= 1
    assert uni.mean().item() == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / n))
    assert uni.double().var().item() == pytest.approx(1 / 12, rel=0.02)
    # Logit-normal (SD3): logit(t) ~ N(m, s^2); E[t] by Gauss-Hermite quadrature of sigmoid(m + s z).
    m, s = 0.5, 0.8
    t = TimeSampler("logit_normal", m, s)(n, g()).double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(m, abs=4 * s / math.sqrt(n))
    assert logit.std().item() == pytest.approx(s, abs=4 * s / math.sqrt(2 * n))
    import numpy as np
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    mean_t = float((weights * (1 / (1 + np.exp(-(m + s * nodes))))).sum() / weights.sum())
    assert t.mean().item() == pytest.approx(mean_t, abs=4 * t.std().item() / math.sqrt(n))
    # Shift: t -> 3t / (1 + 2t); uniform's median 0.5 moves to 0.75.
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    shifted = TimeSampler(shift=3.0)(n, g())
    torch.testing.assert_close(shifted, 3 * uni / (1 + 2 * uni))
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError, match="time distribution"):
        TimeSampler("beta")


# ------------------------------------------------------------------ seeds, guidance
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_samples_depend_only_on_their_seed(sampler):
    run = lambda seeds: sample_flow(oracle, (4, 8, 8), seeds, sampler, 12)  # noqa: E731
    together = run(list(range(6)))
    assert torch.equal(together, torch.cat([run([s]) for s in range(6)]))
    assert torch.equal(run([3, 1]), together[[3, 1]])
    assert not torch.allclose(together[0], together[1])


def test_sde_is_stochastic_and_ode_is_not():
    """Same seed: Euler-Maruyama draws fresh noise every step, so it leaves the ODE's path; diffusion_norm = 0 is
    the Euler ODE."""
    ode = sample_flow(oracle, (4, 8, 8), [0, 1], "euler", 20)
    sde = sample_flow(oracle, (4, 8, 8), [0, 1], "euler_maruyama", 20)
    assert (ode - sde).abs().max() > 0.1
    torch.testing.assert_close(sample_flow(oracle, (4, 8, 8), [0, 1], "euler_maruyama", 20, diffusion_norm=0.0), ode)


class Recorder:
    """The conditional oracle, recording (batch size, t) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t_net, y):
        self.calls.append((x.shape[0], round(t_net[0].item() / FLOW_TIME_SCALE, 6)))
        return oracle(x, t_net, y)


COND, UNCOND = {"y": torch.ones(2)}, {"y": torch.zeros(2)}


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_guidance_scale_one_and_zero(sampler):
    run = lambda **kw: sample_flow(Recorder(), (4, 4, 4), [0, 1], sampler, 10, **kw)  # noqa: E731
    plain = run(cond=COND)
    torch.testing.assert_close(run(cond=COND, uncond=UNCOND, guidance_scale=1.0), plain)
    torch.testing.assert_close(run(cond=COND, uncond=UNCOND, guidance_scale=0.0), run(cond=UNCOND),
                               atol=1e-5, rtol=1e-5)
    assert (run(cond=COND, uncond=UNCOND, guidance_scale=3.0) - plain).abs().max() > 0.05
    with pytest.raises(ValueError, match="uncond"):
        run(cond=COND, guidance_scale=3.0)


@pytest.mark.parametrize("sampler", ["heun", "euler_maruyama"])
def test_guidance_interval(sampler):
    """Guided (doubled-batch) calls happen exactly at times inside [t_lo, t_hi]; outside, the conditional model
    alone. An interval holding no evaluation time is plain conditional sampling, [0, 1] is full guidance."""
    kw = {"cond": COND, "uncond": UNCOND, "guidance_scale": 3.0}
    run = lambda model, **extra: sample_flow(model, (4, 4, 4), [0, 1], sampler, 10, **kw, **extra)  # noqa: E731
    rec = Recorder()
    partial = run(rec, guidance_interval=(0.25, 0.65))  # grid 1, 0.9, ..., 0.1 (Heun also evaluates there)
    assert rec.calls and all((b == 4) == (0.25 <= t <= 0.65) for b, t in rec.calls), rec.calls
    assert {t for b, t in rec.calls if b == 4} == {0.3, 0.4, 0.5, 0.6}
    full = run(Recorder())
    torch.testing.assert_close(run(Recorder(), guidance_interval=(0.0, 1.0)), full)
    plain = sample_flow(Recorder(), (4, 4, 4), [0, 1], sampler, 10, cond=COND)
    torch.testing.assert_close(run(Recorder(), guidance_interval=(0.31, 0.39)), plain)
    assert (partial - full).abs().max() > 1e-3 and (partial - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_interval"):
        run(Recorder(), guidance_interval=(0.6, 0.3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown flow sampler"):
        sample_flow(oracle, (4, 2, 2), [0], "ddim", 10)
    with pytest.raises(ValueError, match="seeds"):
        sample_flow(oracle, (4, 2, 2), [], "euler", 10)
    with pytest.raises(ValueError, match="steps"):
        flow_time_grid(0)

"""DiagonalGaussian against torch.distributions and sampling statistics."""
import torch
from torch.distributions import Normal, kl_divergence

from ldm.first_stage.posterior import DiagonalGaussian


def random_moments(b=3, c=4, h=5, w=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(b, c, h, w, generator=g)
    logvar = torch.randn(b, c, h, w, generator=g) * 2 - 1
    return torch.cat([mean, logvar], dim=1)


def test_fields_split_moments():
    moments = random_moments()
    post = DiagonalGaussian(moments)
    torch.testing.assert_close(post.mean, moments[:, :4])
    torch.testing.assert_close(post.logvar, moments[:, 4:])
    torch.testing.assert_close(post.std, moments[:, 4:].mul(0.5).exp())
    torch.testing.assert_close(post.var, moments[:, 4:].exp())


def test_kl_matches_torch_distributions():
    post = DiagonalGaussian(random_moments())
    ref = kl_divergence(Normal(post.mean, post.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl(), ref, atol=1e-4, rtol=1e-5)


def test_kl_is_zero_for_standard_normal():
    post = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    torch.testing.assert_close(post.kl(), torch.zeros(2))


def test_sample_statistics():
    mean, logvar = torch.tensor([1.5, -2.0]), torch.tensor([0.0, -2.0])
    moments = torch.cat([mean, logvar]).view(1, 4, 1, 1).expand(20_000, 4, 1, 1)
    post = DiagonalGaussian(moments)
    samples = post.sample(torch.Generator().manual_seed(0)).squeeze(-1).squeeze(-1)  # (N, 2)
    # Standard error of the mean is std/sqrt(N) <= 0.0071; 5 sigma tolerance.
    torch.testing.assert_close(samples.mean(0), mean, atol=0.036, rtol=0)
    torch.testing.assert_close(samples.std(0), logvar.mul(0.5).exp(), atol=0.03, rtol=0)


def test_sample_uses_generator():
    post = DiagonalGaussian(random_moments())
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(8)))


def test_mode_is_mean():
    moments = random_moments()
    torch.testing.assert_close(DiagonalGaussian(moments).mode(), moments[:, :4])


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], dim=1)
    post = DiagonalGaussian(moments)
    torch.testing.assert_close(post.logvar.flatten(), torch.tensor([-30.0, 20.0]))
    assert torch.isfinite(post.var).all() and torch.isfinite(post.kl()).all()
    torch.testing.assert_close(post.var.flatten(), torch.tensor([-30.0, 20.0]).exp())


def test_fp32_under_bf16_input():
    moments = random_moments()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        post = DiagonalGaussian(moments.bfloat16())
        kl = post.kl()
        sample = post.sample(torch.Generator().manual_seed(0))
    for t in (post.mean, post.logvar, post.std, post.var, kl, sample, post.mode()):
        assert t.dtype == torch.float32
    ref = DiagonalGaussian(moments.bfloat16().float())
    torch.testing.assert_close(kl, ref.kl())


def test_reparameterised_gradients():
    moments = random_moments(b=2, c=2, h=3, w=3).requires_grad_()
    post = DiagonalGaussian(moments)
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    sample = post.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample, post.mean + post.std * eps)
    sample.sum().backward()
    # d(mean + exp(logvar/2) eps)/d mean = 1, / d logvar = 0.5 std eps.
    torch.testing.assert_close(moments.grad[:, :2], torch.ones_like(post.mean))
    torch.testing.assert_close(moments.grad[:, 2:], 0.5 * post.std.detach() * eps)

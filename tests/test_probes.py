"""Latent probes against closed forms and toy autoencoders with known answers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.evaluation.probes import (DiffusionProbe, equivariance_probe, high_frequency_fraction, linear_probe,
                                   radial_power_spectrum, ridge_fit, spectrum_probe)
from ldm.first_stage.posterior import PointPosterior


def smooth_field(n=16, size=32, seed=0):
    noise = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    kernel = torch.exp(-torch.arange(-6, 7.0) ** 2 / (2 * 2.0 ** 2))
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2)[None, None]
    return F.conv2d(F.pad(noise, (6, 6, 6, 6), mode="circular"), kernel)


def test_white_noise_has_a_flat_spectrum_and_a_smooth_field_a_falling_one():
    white = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    flat = radial_power_spectrum(white)
    assert torch.allclose(flat, torch.ones_like(flat), atol=0.05)
    falling = radial_power_spectrum(smooth_field())
    assert (falling[1:] < falling[:-1]).all() and falling[-1] < 1e-3 * falling[0]
    # White noise: the share of power above the cutoff is the share of frequencies above it (closed form).
    f = torch.fft.fftfreq(32, dtype=torch.float64)
    share = float(((f[:, None] ** 2 + f[None, :] ** 2).sqrt() > 0.25).double().mean())
    assert high_frequency_fraction(white) == pytest.approx(share, abs=0.01)
    probe = spectrum_probe(images=white, latents=smooth_field())
    assert probe["hf_latent"] < 0.01 and probe["hf_ratio"] == pytest.approx(probe["hf_latent"] / probe["hf_image"])


class PointwiseAutoencoder(torch.nn.Module):
    """Encoder and decoder act on each pixel alone (no down-sampling): with a linear map they commute exactly with
    any linear resize, so the equivariance errors are 0; a squaring encoder does not commute with averaging."""

    def __init__(self, linear: bool):
        super().__init__()
        self.linear = linear
        self.weight = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, 3.0]])

    def encode(self, x):
        z = torch.einsum("oc,nchw->nohw", self.weight, x) if self.linear else x.pow(2)
        return PointPosterior(z)

    def decode(self, z):
        return torch.einsum("oc,nchw->nohw", torch.linalg.inv(self.weight), z) if self.linear else z.clamp_min(0).sqrt()


def test_an_exactly_equivariant_autoencoder_has_zero_equivariance_error():
    x = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    exact = equivariance_probe(PointwiseAutoencoder(linear=True), x)
    assert set(exact) == {"eq_image_2", "eq_latent_2", "eq_image_1.33", "eq_latent_1.33"}
    assert all(v < 1e-10 for v in exact.values())
    broken = equivariance_probe(PointwiseAutoencoder(linear=False), x.abs())
    assert all(v > 1e-4 for v in broken.values())


def test_ridge_fit_matches_the_least_squares_closed_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randn(50, 3, generator=g)
    l2 = 0.5
    w = ridge_fit(x, y, l2).numpy()
    # Ridge (bias unpenalised) is least squares on the system stacked with sqrt(l2)·I rows for the weights.
    a = np.concatenate([np.c_[x.numpy(), np.ones(50)], np.c_[np.sqrt(l2) * np.eye(6), np.zeros(6)]]).astype(np.float64)
    b = np.concatenate([y.numpy(), np.zeros((6, 3))]).astype(np.float64)
    assert np.allclose(w, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-10)


def test_linear_probe_reads_classes_that_the_latents_encode_linearly():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    means = torch.randn(4, 2, 4, 4, generator=g)
    latents = means[labels] + 0.1 * torch.randn(200, 2, 4, 4, generator=g)
    assert linear_probe(latents, labels)["linear_accuracy"] == 1.0
    assert linear_probe(torch.randn(200, 2, 4, 4, generator=g), labels)["linear_accuracy"] < 0.5


def test_the_diffusion_probe_is_deterministic_and_learns_a_learnable_distribution():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 4
    latents = torch.randn(4, 2, 4, 4, generator=g)[labels] + 0.05 * torch.randn(256, 2, 4, 4, generator=g)
    latents = (latents - latents.mean()) / latents.std()
    probe = DiffusionProbe(steps=60, batch_size=32, hidden_size=32, depth=2, num_heads=2, samples=8, sample_steps=4)
    untrained = probe.validation_loss(probe.build(latents.shape[1:], 4).eval(), latents, labels)
    runs = [probe.validation_loss(probe.train(latents, labels, 4), latents, labels) for _ in range(2)]
    assert runs[0] == runs[1]  # same seed, same numbers
    assert runs[0]["probe_loss"] < 0.7 * untrained["probe_loss"]
    samples, sample_labels = probe.sample(probe.train(latents, labels, 4), latents.shape[1:], 4)
    assert samples.shape == (8, 2, 4, 4) and sample_labels.tolist() == [0, 1, 2, 3] * 2


def test_probe_command_runs_every_probe_on_a_run_folder_and_repeats_itself(run_dir, tmp_path):
    """scripts/probe_latents.py on a stage-1 run (its own data config: two labelled image folders): every probe
    reports, the random detector's distance is never called KID, and a second run gives the same numbers."""
    from conftest import command_module
    script = command_module("probe_latents")
    argv = ["--ae", str(run_dir), "--split", "train", "--max-samples", "20", "--diffusion-steps", "3",
            "--diffusion-samples", "4", "--detector", "random", "--out", str(tmp_path / "p.json")]
    first, second = script.main(argv)["results"], script.main(argv)["results"]
    assert first == second
    expected = {"hf_latent", "hf_ratio", "eq_image_2", "eq_latent_1.33", "mmd_25", "linear_accuracy", "probe_loss",
                "probe_random_kernel_distance"}
    assert expected <= set(first) and "probe_kid" not in first
    assert (tmp_path / "p.md").is_file()


def test_the_probe_callback_logs_curves_from_a_tiny_stage1_run(tmp_path):
    """lightning.callbacks.latent_probes on the tiny LiteVAE: probe/<name> columns at steps 2 and 4 (the last) in
    csv/metrics.csv, the autoencoder back in training mode between calls."""
    from helpers import csv_rows, train
    run = train(tmp_path, "lightning.trainer.max_steps=4",
                "lightning.callbacks.latent_probes.target=autoencoder.probe_callback.LatentProbes",
                "lightning.callbacks.latent_probes.params.every_n_steps=2",
                "lightning.callbacks.latent_probes.params.n_images=8",
                "lightning.callbacks.latent_probes.params.probes=[spectrum,equivariance,gaussian,diffusion]",
                "lightning.callbacks.latent_probes.params.diffusion_steps=2")
    rows = [r for r in csv_rows(run) if r.get("probe/hf_ratio")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert float(r["probe/hf_latent"]) > 0 and float(r["probe/eq_image_2"]) > 0 and r["probe/probe_loss"]


def test_the_equivariance_regulariser_is_zero_for_an_equivariant_autoencoder_and_trains(tmp_path):
    """model.params.loss.params.equivariance_weight: L1(D(down_s(z)), down_s(x)); 0 for the exactly equivariant toy,
    > 0 for the squaring one; a tiny run with it logs train/eq and counts it in train/loss; a negative weight is
    refused naming the key; a config written before the term moved into the loss (model.params.equivariance_weight)
    still sets it."""
    from helpers import build_module, csv_rows, train
    from ldm.util import ConfigError
    module = build_module(loss={"params": {"equivariance_weight": 1.0}})
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    for linear, zero in ((True, True), (False, False)):
        ae = PointwiseAutoencoder(linear)
        loss = module.loss.equivariance(x, ae.encode(x).mode(), ae.decode, torch.Generator().manual_seed(0))
        assert (float(loss) < 1e-6) == zero
    run = train(tmp_path, "lightning.trainer.max_steps=2", "model.params.loss.params.equivariance_weight=0.5")
    rows = [r for r in csv_rows(run) if r.get("train/eq")]
    assert rows and all(float(r["train/eq"]) > 0 for r in rows)
    with pytest.raises(ConfigError, match="equivariance_weight=-1"):
        build_module(loss={"params": {"equivariance_weight": -1.0}})
    assert build_module(equivariance_weight=0.5).loss.equivariance_weight == 0.5


def test_the_diffusion_probe_leaves_the_global_random_state_alone():
    """The stage-1 callback runs it inside training: it must not reseed the run's global generator."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    DiffusionProbe(steps=1, hidden_size=16, depth=1, num_heads=2).build((2, 4, 4), None)
    assert torch.equal(torch.rand(3), expected)

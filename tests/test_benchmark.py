"""Smoke test of scripts/benchmark.py: every suite runs at tiny sizes and reports every ratio.

Not a timing test (DESIGN.md §4): speed is measured by the script itself, never asserted here. The
numbers that can be checked against a reference are: the DWT error against ptwt, and the saved-bytes
counter against a hand count.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from ldm.tools.benchmarking import count_saved_bytes

ROOT = Path(__file__).resolve().parents[1]
RATIO_KEYS = {
    "encoder_throughput_S_vs_sd", "encoder_throughput_B_vs_sd", "inference_peak_mem_B_vs_sd",
    "train_saved_bytes_B_vs_sd", "train_saved_bytes_B_ckpt_vs_sd", "dwt_fwd_speedup_vs_ptwt",
    "dwt_fwdbwd_speedup_vs_ptwt", "dwt_max_abs_err", "cache_vs_bare_encoder_throughput",
    "train_ae_step_speedup_B_vs_sd", "train_ldm_cached_vs_live_speedup",
}


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert _load_script().main(argv) == 0
    result = json.loads(out.read_text())
    assert RATIO_KEYS <= set(result["ratios"])
    assert all(v > 0 for k, v in result["ratios"].items() if k != "dwt_max_abs_err")
    assert result["ratios"]["dwt_max_abs_err"] <= 1e-5  # against ptwt.wavedec2
    assert {r["suite"] for r in result["results"]} == {"encoder", "memory", "dwt", "cache", "train-ae",
                                                       "train-ldm"}
    assert result["machine"]["torch"] == torch.__version__

"""Inference peak memory (a fresh process per model) and the bytes autograd saves for backward."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from lab.stages import ROOT
from lab.bench.common import autocast, batch_for, build_encoder, images, prepare, train_forward_backward
from lab.bench.measure import count_saved_bytes, peak_memory_growth, peak_rss_growth


def _probe_command(name: str, args, batch: int) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--probe-memory", name, "--device", args.device,
           "--resolution", str(args.resolution), "--batch", str(batch), "--threads", str(torch.get_num_threads())]
    return cmd + ["--bf16"] * args.bf16 + ["--channels-last"] * args.channels_last


def probe_memory(args) -> int:
    """In a fresh process: build the encoder, then measure one inference forward's peak growth, first as
    RSS (CPU; includes the first call's oneDNN caches) and then as allocated tensor bytes."""
    enc = prepare(build_encoder(args.probe_memory), args).eval()
    x = images(args, args.batch)

    def forward():
        with torch.inference_mode(), autocast(args):
            enc(x)
    cpu = torch.device(args.device).type == "cpu"
    rss = peak_rss_growth(forward) if cpu else None  # CPU: the first call's RSS, oneDNN caches included
    if not cpu:
        forward()  # warm-up: cuDNN autotuning and library workspaces are not activations
    print(json.dumps({"allocated": peak_memory_growth(forward, args.device), "rss": rss}))
    return 0


def checkpoint_inputs_bytes(batch: int, resolution: int) -> int:
    """Bytes the checkpointed LiteVAE keeps alive for recomputation (its UNet inputs; fp32, not seen by
    saved-tensor hooks): 12 wavelet bands per level at H/2^l plus the aggregator's 36 channels at H/8."""
    bands = sum(12 * (resolution // 2**level) ** 2 for level in (1, 2, 3))
    return 4 * batch * (bands + 36 * (resolution // 8) ** 2)


def suite_memory(args, ratios: dict) -> list[dict]:
    names = ["LiteVAE-B", "SD-VAE"]
    batch = batch_for(args, 2, 4)
    rows, inference, rss, saved = [], {}, {}, {}
    # One fresh process per model (peak RSS is a per-process high-water mark), both at once: only memory is
    # measured there, not time. A fixed mmap threshold makes glibc return every freed block >= 64 KiB to the
    # OS at once, so the RSS follows the live tensors (the default dynamic threshold lets them linger, +-30 %).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    probes = {n: subprocess.Popen(_probe_command(n, args, batch), stdout=subprocess.PIPE, text=True, env=env)
              for n in names}
    for n, proc in probes.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory probe for {n} failed (exit {proc.returncode})")
        probe = json.loads(out.strip().splitlines()[-1])
        inference[n], rss[n] = probe["allocated"], probe["rss"]
    x = images(args, batch)
    for n, ckpt in (("LiteVAE-B", False), ("LiteVAE-B", True), ("SD-VAE", False)):
        enc = prepare(build_encoder(n, checkpointing=ckpt), args).train()
        with count_saved_bytes(exclude=enc.parameters()) as counted, autocast(args):
            enc(x)
        label = n + (" (checkpointing)" if ckpt else "")
        saved[label] = counted["bytes"] + (checkpoint_inputs_bytes(batch, args.resolution) if ckpt else 0)
        if torch.device(args.device).type == "cuda":
            saved[label + " cuda_train_peak"] = peak_memory_growth(
                lambda enc=enc: train_forward_backward(enc, x, args), args.device)
        del enc
    mib = 2**20
    ratios["inference_peak_mem_B_vs_sd"] = round(inference["LiteVAE-B"] / inference["SD-VAE"], 3)
    ratios["train_saved_bytes_B_vs_sd"] = round(saved["LiteVAE-B"] / saved["SD-VAE"], 3)
    ratios["train_saved_bytes_B_ckpt_vs_sd"] = round(saved["LiteVAE-B (checkpointing)"] / saved["SD-VAE"], 3)
    for n in names:
        rows.append({"suite": "memory", "name": f"{n} inference peak allocated", "MiB": round(inference[n] / mib, 1),
                     "ratio_vs_sd_vae": round(inference[n] / inference["SD-VAE"], 3)})
    if rss["SD-VAE"]:  # CPU only: RSS adds what is not tensors (oneDNN primitive/weight caches, malloc arena)
        ratios["inference_peak_rss_B_vs_sd"] = round(rss["LiteVAE-B"] / rss["SD-VAE"], 3)
        rows += [{"suite": "memory", "name": f"{n} inference peak RSS growth", "MiB": round(rss[n] / mib, 1),
                  "ratio_vs_sd_vae": round(rss[n] / rss["SD-VAE"], 3)} for n in names]
    for label, b in saved.items():
        ref = saved["SD-VAE cuda_train_peak" if "cuda" in label else "SD-VAE"]
        rows.append({"suite": "memory", "name": f"{label} saved for backward" if "cuda" not in label else label,
                     "MiB": round(b / mib, 1), "ratio_vs_sd_vae": round(b / ref, 3)})
    for r in rows:
        r.update(batch=batch, resolution=args.resolution)
    return rows

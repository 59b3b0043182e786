#!/usr/bin/env python
"""Side-by-side speed and memory benchmarks: one table and one set of ratios from a single run.

    python scripts/benchmark.py --suite all --quick            # about a minute on a 2-core CPU
    python scripts/benchmark.py --suite encoder                # LiteVAE-S/B/M/L vs SD-VAE encoder, 256x256
    python scripts/benchmark.py --suite all --out bench.json   # full run (CPU: minutes; CUDA: bf16, batch 32)
    python scripts/benchmark.py --suite tiling --quick         # tiled vs whole encoding, 1024x1024
    python scripts/benchmark.py --suite roofline               # FLOPs, minimum bytes, H200 bound (CPU counts)
    python scripts/benchmark.py --suite profile --device cuda  # per-kernel tables, training fwd+bwd
    python scripts/benchmark.py --suite train                  # training steps: layouts, precisions, GFLOP/s

Suites: encoder (forward throughput), memory (inference peak in a fresh process; bytes saved for backward;
CUDA training peak), dwt (fast Haar vs ptwt.wavedec2), cache (latent caching vs bare encoder forward),
train-ae (full autoencoder training step, same decoder and loss), train-ldm (diffusion step on cached
latents vs live encoding); by name only: tiling (LiteVAE-B encoding at 1024x1024, 512-px tiles vs whole),
roofline (docs/benchmarks.md), profile, train (whole Lightning training steps of the tiny stage-1 and stage-2
configs in the layouts and precisions that matter on CPU, GFLOP/s against the encoder's inference rate), and
step-profile (the same steps split into parts, networks and ops: docs/benchmarks.md). On CUDA in eager mode the encoder, train-ae and profile suites also run
LiteVAE-B and SD-VAE with the fused GroupNorm+SiLU kernel (``... fused`` rows, ``_fused`` ratio keys);
``--compile`` runs add ``_compiled`` to the ratio keys. The targets these ratios were measured against are in
docs/benchmarks.md, not in the code.
Timings interleave the candidates round-robin so that other load on the machine slows all of them alike;
medians are reported. Defaults: CPU fp32; CUDA bf16 autocast, channels_last, batch 32.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from lab.bench import cache, dwt, encoder, memory, profile, roofline, tiling, train
from ldm.io import write_json_atomic
from ldm.script_options import check_output_file
from lab.bench.measure import format_table, machine_info

# Memory first: its fresh-process RSS probe measured 122/266 MiB (LiteVAE-B/SD-VAE) when the parent had run
# nothing yet but 745/641 MiB after the parent had run the encoder suite (cause not established; the
# allocated-bytes figure was 110.6/256.6 MiB both times), so `--suite all` matches `--suite memory`.
SUITES = {"memory": memory.suite_memory, "encoder": encoder.suite_encoder, "dwt": dwt.suite_dwt,
          "cache": cache.suite_cache, "train-ae": train.suite_train_ae, "train-ldm": train.suite_train_ldm}
# Run only by name: tiling (fixed 1024x1024 images, minutes on a CPU); roofline (counts, no timing; on CPU);
# profile (per-kernel tables of a training forward+backward; meant for CUDA); train and step-profile (the tiny
# configs' training steps through pl.Trainer, and where their time goes; CPU, minutes).
EXTRA_SUITES = {"tiling": tiling.suite_tiling, "roofline": roofline.suite_roofline, "profile": profile.suite_profile,
                "train": train.suite_train, "step-profile": train.suite_step_profile}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="encoder", choices=[*SUITES, *EXTRA_SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="small batches, few repeats (about a minute on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256, help="encoder/memory/dwt/cache image size")
    p.add_argument("--train-resolution", type=int, default=0, help="train-ae/train-ldm image size (0: default)")
    p.add_argument("--batch", type=int, default=0, help="0: suite default (CPU small; CUDA 32)")
    p.add_argument("--repeats", type=int, default=0, help="0: suite default")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last models and inputs (default: on for CUDA, off for CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (slow first call)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark (default: on; CUDA only)")
    p.add_argument("--out", default="", help="write machine, arguments, rows and ratios as JSON here")
    p.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)  # internal: fresh-process probe
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:  # a bad --out fails now, not after minutes of timing
        check_output_file(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every suite runs fixed shapes, so let cuDNN pick its fastest kernels (during the warm-up calls).
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.probe_memory:
        return memory.probe_memory(args)
    torch.manual_seed(0)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    rows, ratios, seconds = [], {}, {}
    for name in suites:
        t0 = time.perf_counter()
        rows += {**SUITES, **EXTRA_SUITES}[name](args, ratios)
        seconds[name] = round(time.perf_counter() - t0, 1)
    info = machine_info()
    print(f"machine: {info}")
    print(f"suite seconds: {seconds}")
    print(format_table(rows))
    print("\nratios (docs/benchmarks.md reads them):")
    print("\n".join(f"  {key:36s} {value:g}" if isinstance(value, (int, float)) else f"  {key:36s} {value}"
                     for key, value in ratios.items()))
    if args.out:
        write_json_atomic(args.out, {"machine": info, "args": vars(args), "suite_seconds": seconds,
                                     "results": rows, "ratios": ratios}, indent=2, default=str)
    return 0


if __name__ == "__main__":  # also the memory suite's fresh-process probe (lab/bench/memory.py)
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())


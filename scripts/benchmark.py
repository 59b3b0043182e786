"""Side-by-side speed benchmarks, printed as one table of ratios from a single run.

    python scripts/benchmark.py --suite encoder            # LiteVAE-S/B vs SD-VAE encoder, 256x256
    python scripts/benchmark.py --suite dwt                # fast Haar DWT vs ptwt.wavedec2
    python scripts/benchmark.py --suite all --quick        # about a minute on a laptop CPU

Timings interleave the candidates round-robin so that a machine slowing down (thermal, other load)
affects all of them alike; the median of the repeats is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoencoder.litevae_encoder import LiteVAEEncoder  # noqa: E402
from autoencoder.sd_vae import Encoder as SDEncoder  # noqa: E402
from autoencoder.wavelets import haar_dwt_pyramid  # noqa: E402
from ldm.util import count_params  # noqa: E402


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def suite_encoder(args) -> list[dict]:
    device = torch.device(args.device)
    sizes = ["S", "B"] if args.quick else ["S", "B", "M", "L"]
    encoders = {f"LiteVAE-{s}": LiteVAEEncoder(size=s, z_channels=4) for s in sizes}
    encoders["SD-VAE"] = SDEncoder(z_channels=4, double_z=True)
    batch = args.batch or (2 if args.quick else 4)
    x = torch.randn(batch, 3, args.resolution, args.resolution, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    fns = {}
    for name, enc in encoders.items():
        enc.to(device).eval()

        def run(enc=enc):
            with torch.no_grad(), autocast:
                return enc(x)
        fns[name] = run
    secs = time_round_robin(fns, repeats=args.repeats or (2 if args.quick else 5))
    base = batch / secs["SD-VAE"]
    rows = []
    for name, s in secs.items():
        ips = batch / s
        rows.append({"suite": "encoder", "name": name, "params": count_params(encoders[name]),
                     "images_per_s": round(ips, 3), "ratio_vs_sd_vae": round(ips / base, 2),
                     "batch": batch, "resolution": args.resolution, "bf16": args.bf16})
    return rows


def suite_dwt(args) -> list[dict]:
    import ptwt

    device = torch.device(args.device)
    batch = args.batch or (4 if args.quick else 16)
    x = torch.randn(batch, 3, args.resolution, args.resolution, device=device)

    def ptwt_levels(inp):
        out = []
        for level in (1, 2, 3):
            coeffs = ptwt.wavedec2(inp, "haar", level=level, mode="symmetric")
            out.append(torch.cat([coeffs[0], *coeffs[1]], dim=1) / 2**level)
        return out

    xg = x.clone().requires_grad_(True)
    fns = {
        "fast fwd": lambda: haar_dwt_pyramid(x, 3),
        "ptwt fwd": lambda: ptwt_levels(x),
        "fast fwd+bwd": lambda: sum(t.sum() for t in haar_dwt_pyramid(xg, 3)).backward(),
        "ptwt fwd+bwd": lambda: sum(t.sum() for t in ptwt_levels(xg)).backward(),
    }
    secs = time_round_robin(fns, repeats=args.repeats or (5 if args.quick else 20))
    err = max((a - b).abs().max().item() for a, b in zip(haar_dwt_pyramid(x, 3), ptwt_levels(x)))
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        ratio = secs[f"ptwt {mode}"] / secs[f"fast {mode}"]
        rows.append({"suite": "dwt", "name": f"fast DWT {mode}", "ms": round(1e3 * secs[f"fast {mode}"], 2),
                     "ptwt_ms": round(1e3 * secs[f"ptwt {mode}"], 2), "speedup_vs_ptwt": round(ratio, 2),
                     "max_abs_err": err, "batch": batch, "resolution": args.resolution})
    return rows


SUITES = {"encoder": suite_encoder, "dwt": suite_dwt}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict]) -> None:
    for suite in dict.fromkeys(r["suite"] for r in rows):
        sub = [r for r in rows if r["suite"] == suite]
        keys = [k for k in sub[0] if k != "suite"]
        widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in sub)) for k in keys}
        print(f"\n[{suite}]")
        print("  ".join(k.ljust(widths[k]) for k in keys))
        for r in sub:
            print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="encoder", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="small batches and few repeats (about a minute on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=0, help="0: suite default")
    p.add_argument("--repeats", type=int, default=0, help="0: suite default")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the CUDA setting)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    rows = [row for name in suites for row in SUITES[name](args)]
    print(f"machine: {machine()}")
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

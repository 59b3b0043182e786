#!/usr/bin/env python
"""Latent diagnostics of a latent cache: per-channel statistics (manifest vs recomputed from a sample of
shards) and the MMD² of the latents to N(0, I) with RBF kernels (LiteVAE paper, Table 6), mean ± std over
repeats.

  python scripts/latent_stats.py --cache latents/ffhq_litevae --split train --n 2000 --repeats 3 --out lat.json

MMD convention (ldm/metrics/mmd.py): flattened latents, k = exp(-|a-b|² / 2σ²), unbiased estimator. Compare
encoders with each other on the same n and σ; the paper's absolute numbers are on an unstated scale.
"""
from __future__ import annotations

import argparse

from ldm.script_options import setup_logging, finish, add_out, check_output_file, positive_float, positive_int
from ldm.evaluation import latent_diagnostics
from ldm.io import markdown_table
from ldm.metrics.mmd import DEFAULT_BANDWIDTHS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/latent_stats.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="latent cache folder (with manifest.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=positive_int, default=2000, help="latents per MMD estimate (>= 2)")
    p.add_argument("--bandwidths", type=positive_float, nargs="+", default=list(DEFAULT_BANDWIDTHS))
    p.add_argument("--repeats", type=positive_int, default=3, help="independent MMD estimates (mean ± std)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-mean", action="store_true", help="posterior means instead of posterior samples")
    p.add_argument("--normalize", action="store_true", help="apply the manifest's shift and scale_factor first")
    add_out(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.n < 2:
        p.error(f"argument --n: must be >= 2 (the unbiased MMD² needs two latents), got {args.n}")
    return args


def tables(report: dict) -> str:
    man, smp = report["manifest"], report["sample"]
    channels = [{"channel": c, "manifest mean": man["channel_mean"][c], "manifest std": man["channel_std"][c],
                 "sample mean": smp["channel_mean"][c], "sample std": smp["channel_std"][c],
                 "mean posterior std": smp["mean_posterior_std"][c]} for c in range(len(smp["channel_mean"]))]
    mmd = [{"σ": s, "MMD² mean": v["mean"], "MMD² std": v["std"]}
           for s, v in report["mmd"]["per_bandwidth"].items()]
    m = report["mmd"]
    return (markdown_table(channels) + f"\nMMD² to N(0, I): {m['latents']}, normalized={m['normalized']}, "
            f"n={m['n_per_repeat']}, repeats={m['repeats']}\n\n" + markdown_table(mmd))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = check_output_file(args.out, "--out") if args.out else None  # before the latents are read
    setup_logging()
    try:
        report = latent_diagnostics(args.cache, args.split, args.n, args.bandwidths, args.repeats, args.seed,
                                    args.use_mean, args.normalize)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return finish(out, report, tables(report))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Downstream comparison of encoders: LiteVAE vs the SD-VAE baseline, end to end, in one command.

  python scripts/compare_encoders.py                                   # tiny Fashion-MNIST (make compare)
  python scripts/compare_encoders.py --ae-steps 2000 --ldm-steps 5000 --out outputs/cmp_long
  python scripts/compare_encoders.py --ae-minutes 20 --ldm-minutes 30  # wall-clock budget per training run
  python scripts/compare_encoders.py --data configs/data/my.yaml \\
      --arm litevae LiteVAE-B configs/autoencoder/litevae.yaml configs/ldm/my_litevae.yaml \\
      --arm sd_vae SD-VAE configs/autoencoder/sd_vae.yaml configs/ldm/my_sd_vae.yaml
  python scripts/compare_encoders.py --out outputs/cmp_public \\
      --arm litevae LiteVAE configs/autoencoder/litevae_tiny.yaml configs/ldm/fmnist_litevae_tiny.yaml \\
      --arm sd_ft_mse SD-VAE-ft-MSE ~/vae/sd-vae-ft-mse configs/ldm/fmnist_sd_vae_tiny.yaml  # diffusers folder

For every arm: stage 1 (same decoder, loss and steps; skipped for a pretrained first stage, used as is: a
diffusers folder (pip install diffusers), a stage-1 run folder, .ckpt or .safetensors) -> cache_latents.py
(train + validation split of --data) -> stage 2 (same LDM config and steps) -> sample.py (same seeds) ->
eval_autoencoder.py and eval_fid.py; then encoder parameters and throughput, and the report: <out>/report.md,
plots/, grids/. Every command is printed before it runs. Re-running the same command resumes where it stopped
(finished stages are recorded in <out>/state.json; an interrupted training run continues from its last.ckpt).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from ldm.tools.args import check_output_dir, positive_float, positive_int
from ldm.tools.compare import TINY_FMNIST_ARMS, Arm, CompareOptions, run_comparison


def parse_args(argv: list[str] | None = None) -> CompareOptions:
    d = CompareOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out_dir, help="report folder (also holds runs/, latents/, samples/, eval/)")
    p.add_argument("--data", default=d.data, help="data config: its train split is cached for stage 2, its "
                                                  "validation split is the evaluation reference")
    p.add_argument("--arm", nargs=4, action="append", metavar=("KEY", "LABEL", "AE", "LDM_CONFIG"),
                   help="an encoder to compare (repeat; default: the tiny Fashion-MNIST LiteVAE and SD-VAE). AE: a "
                        "stage-1 config to train, or a pretrained first stage used as is (diffusers folder, "
                        "stage-1 run folder, .ckpt, .safetensors)")
    p.add_argument("--ae-steps", type=positive_int, help="stage-1 steps (the discriminator starts halfway)")
    p.add_argument("--ae-minutes", type=positive_float, help="stage-1 wall-clock budget per run")
    p.add_argument("--ldm-steps", type=positive_int, help="stage-2 steps")
    p.add_argument("--ldm-minutes", type=positive_float, help="stage-2 wall-clock budget per run")
    p.add_argument("--seeds", default=d.seeds, help="sample seeds (the same for every arm)")
    p.add_argument("--sample-batch", type=positive_int, default=d.sample_batch)
    p.add_argument("--detector", default=d.detector, help="auto | inception | random | PATH (FID features)")
    p.add_argument("--eval-samples", type=positive_int, default=d.eval_samples, help="validation images for PSNR/SSIM/rFID")
    p.add_argument("--no-classifier", action="store_true", help="skip the class accuracy (unlabelled data)")
    p.add_argument("--ae-overrides", nargs="*", default=[], help="key=value overrides for every stage-1 run")
    p.add_argument("--ldm-overrides", nargs="*", default=[], help="key=value overrides for every stage-2 run")
    a = p.parse_args(argv)
    arms = [Arm(*spec) for spec in a.arm] if a.arm else list(TINY_FMNIST_ARMS)
    return CompareOptions(out_dir=a.out, data=a.data, arms=arms, ae_steps=a.ae_steps, ae_minutes=a.ae_minutes,
                          ldm_steps=a.ldm_steps, ldm_minutes=a.ldm_minutes, seeds=a.seeds,
                          sample_batch=a.sample_batch, detector=a.detector, eval_samples=a.eval_samples,
                          classifier=not a.no_classifier, ae_overrides=a.ae_overrides, ldm_overrides=a.ldm_overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    check_output_dir(opts.out_dir, "--out")
    command = shlex.join(["python", "scripts/compare_encoders.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        report = run_comparison(opts, command=command)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"\n{report.read_text()}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Downstream comparison of encoders: LiteVAE vs the SD-VAE baseline, end to end, in one command.

  python scripts/compare_encoders.py                                   # make compare: paper-ratio arms, 2 repeats
  python scripts/compare_encoders.py --arms litevae lite_s sd_vae --ae-steps 1200 --ldm-steps 1500 --repeats 3 \
      --out outputs/compare_full                                       # make compare-full
  python scripts/compare_encoders.py --arms litevae sd_vae sd_vae_equal --out outputs/cmp_equal  # + equal-size SD
  python scripts/compare_encoders.py --repeats 4 --no-photos --out outputs/cmp_r4
  python scripts/compare_encoders.py --ae-steps 2000 --ldm-steps 5000 --out outputs/cmp_long
  python scripts/compare_encoders.py --ae-minutes 20 --ldm-minutes 30  # wall-clock budget per training run
  python scripts/compare_encoders.py --data configs/data/my.yaml \\
      --arm litevae LiteVAE-B configs/autoencoder/litevae.yaml configs/ldm/my_litevae.yaml \\
      --arm sd_vae SD-VAE configs/autoencoder/sd_vae.yaml configs/ldm/my_sd_vae.yaml
  python scripts/compare_encoders.py --out outputs/cmp_public \\
      --arm litevae LiteVAE configs/autoencoder/litevae_tiny.yaml configs/ldm/fmnist_litevae_tiny.yaml \\
      --arm sd_ft_mse SD-VAE-ft-MSE ~/vae/sd-vae-ft-mse configs/ldm/fmnist_sd_vae_tiny.yaml  # diffusers folder

Default arms: the tiny LiteVAE and an SD-layout encoder (ch_mult [1,2,4,4]) with ~5x its parameters, the
paper's SD-VAE : LiteVAE-B ratio; --arms picks others by key (lite_s: the tiny LiteVAE at the S model's widths;
sd_vae_equal: an SD-layout encoder of the tiny LiteVAE's size). For every arm and repeat (repeat r: training seed r, sample seeds + r*100000):
stage 1 (same decoder, loss and steps; skipped for a pretrained first stage, used as is: a diffusers folder
(pip install diffusers), a stage-1 run folder, .ckpt or .safetensors) -> cache_latents.py (train + validation
split of --data) -> stage 2 (same LDM config and steps) -> sample.py (same seeds) -> eval_autoencoder.py and
eval_fid.py; stage 1 again on natural photos (--photos) and its evaluation. Then encoder parameters, FLOPs,
throughput and memory, and the report: <out>/report.md (a verdict on the paper's claims, every metric as
mean +- std over repeats with Welch's t-test), plots/, grids/. Every command is printed before it runs.
Re-running the same command resumes where it stopped (finished stages are recorded in <out>/state.json; an
interrupted training run continues from its last.ckpt).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from ldm.script_options import setup_logging, add_detector, check_output_dir, positive_float, positive_int
from lab.compare import KNOWN_ARMS, Arm, CompareOptions, run_comparison


def build_parser() -> argparse.ArgumentParser:
    d = CompareOptions()
    p = argparse.ArgumentParser(prog="scripts/compare_encoders.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out_dir, help="report folder (also holds runs/, latents/, samples/, eval/)")
    p.add_argument("--data", default=d.data, help="data config: its train split is cached for stage 2, its "
                                                  "validation split is the evaluation reference")
    p.add_argument("--arm", nargs=4, action="append", metavar=("KEY", "LABEL", "AE", "LDM_CONFIG"),
                   help="an encoder to compare (repeat; the first is the reference of the plots, every pair is "
                        "tested; default: the tiny LiteVAE and the 5x SD-VAE encoder). AE: a "
                        "stage-1 config to train, or a pretrained first stage used as is (diffusers folder, "
                        "stage-1 run folder, .ckpt, .safetensors)")
    p.add_argument("--arms", nargs="+", choices=list(KNOWN_ARMS),
                   help="built-in arms by key, before any --arm (the first is the reference; default without --arm: "
                        + " ".join(a.key for a in d.arms) + ")")
    p.add_argument("--repeats", type=positive_int, default=d.repeats,
                   help="independent repeats of every stage (other training and sample seeds each)")
    p.add_argument("--photos", default=d.photos, help="data config of natural photos for a second stage-1 run "
                                                      "per arm and repeat (reconstruction only)")
    p.add_argument("--no-photos", action="store_true", help="skip the natural-photo stage-1 runs")
    p.add_argument("--ldm-config", help="one stage-2 config for every arm instead of the arms' own (e.g. "
                                        "configs/ldm/fmnist_dit_flow_tiny.yaml: a DiT trained by flow matching)")
    p.add_argument("--jobs", type=positive_int, default=d.jobs,
                   help="(arm, repeat) chains run at once, each command with cpu_count/jobs threads (1: one at a time)")
    p.add_argument("--ae-steps", type=positive_int, default=d.ae_steps,
                   help="stage-1 steps per run (the discriminator starts halfway)")
    p.add_argument("--ae-minutes", type=positive_float, help="stage-1 wall-clock budget per run")
    p.add_argument("--ldm-steps", type=positive_int, default=d.ldm_steps, help="stage-2 steps per run")
    p.add_argument("--ldm-minutes", type=positive_float, help="stage-2 wall-clock budget per run")
    p.add_argument("--seeds", default=d.seeds, help="sample seeds (the same for every arm)")
    p.add_argument("--sample-batch", type=positive_int, default=d.sample_batch)
    add_detector(p)
    p.add_argument("--eval-samples", type=positive_int, default=d.eval_samples, help="validation images for PSNR/SSIM/rFID")
    p.add_argument("--no-classifier", action="store_true", help="skip the class accuracy (unlabelled data)")
    p.add_argument("--ae-overrides", nargs="*", default=[], help="key=value overrides for every stage-1 run")
    p.add_argument("--ldm-overrides", nargs="*", default=[], help="key=value overrides for every stage-2 run")
    return p


def parse_args(argv: list[str] | None = None) -> CompareOptions:
    a = build_parser().parse_args(argv)
    builtin = a.arms or ([] if a.arm else [arm.key for arm in CompareOptions().arms])
    arms = [KNOWN_ARMS[key] for key in builtin] + [Arm(*spec) for spec in a.arm or []]
    if len({arm.key for arm in arms}) < len(arms):
        raise SystemExit(f"error: arm keys must differ: {[arm.key for arm in arms]}")
    return CompareOptions(out_dir=a.out, data=a.data, photos=None if a.no_photos else a.photos, arms=arms,
                          repeats=a.repeats, ldm_config=a.ldm_config, ae_steps=a.ae_steps,
                          ae_minutes=a.ae_minutes,
                          ldm_steps=a.ldm_steps, ldm_minutes=a.ldm_minutes, seeds=a.seeds,
                          sample_batch=a.sample_batch, detector=a.detector, eval_samples=a.eval_samples,
                          classifier=not a.no_classifier, jobs=a.jobs, ae_overrides=a.ae_overrides,
                          ldm_overrides=a.ldm_overrides)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
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
    main()

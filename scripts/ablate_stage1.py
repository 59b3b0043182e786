#!/usr/bin/env python
"""Stage-1 ablation at an equal budget: variants of an autoencoder config, trained and evaluated alike.

  python scripts/ablate_stage1.py --out outputs/compare_fmnist      # after make compare: reuses its photo runs
  python scripts/ablate_stage1.py --steps 1600 --out outputs/ablate_photos_long   # a longer budget, own folder
  python scripts/ablate_stage1.py --only litevae lite_tiny_gn2 --repeats 3 --out outputs/ablate_gn

Each variant (config + key=value overrides, listed in --plan) is trained --repeats times (repeat r: main.py -s r)
on the plan's data config and evaluated on its validation split (PSNR/SSIM/LPIPS/rFID).
<out>/report_ablation_<plan>.md (never make compare's report.md): mean ± std per variant, the difference to
the first variant with Welch's t-test, and validation curves. Re-running the same command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from lab.ablation import AblationOptions, run_ablation
from ldm.script_options import setup_logging, add_detector, check_output_dir, positive_int


DEFAULT_PLAN = "configs/ablations/photos_stage1.yaml"


def build_parser() -> argparse.ArgumentParser:
    d = AblationOptions(plan=DEFAULT_PLAN)
    p = argparse.ArgumentParser(prog="scripts/ablate_stage1.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default=d.plan, help="YAML with the data config and the variants")
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--repeats", type=positive_int, default=d.repeats)
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help="stage-1 steps per run (default: make compare's; the discriminator starts halfway)")
    add_detector(p)
    p.add_argument("--eval-samples", type=positive_int, default=d.eval_samples)
    p.add_argument("--jobs", type=positive_int, default=d.jobs, help="runs at once (each with cpu_count/jobs threads)")
    p.add_argument("--only", nargs="*", default=[], help="variant keys to run (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging()
    check_output_dir(a.out, "--out")
    opts = AblationOptions(plan=a.plan, out_dir=a.out, repeats=a.repeats, steps=a.steps, detector=a.detector,
                           eval_samples=a.eval_samples, only=a.only, jobs=a.jobs)
    command = shlex.join(["python", "scripts/ablate_stage1.py", *(sys.argv[1:] if argv is None else argv)])
    report = run_ablation(opts, command=command)
    print(f"\n{report.read_text()}\nreport: {report}")
    return 0


if __name__ == "__main__":
    main()

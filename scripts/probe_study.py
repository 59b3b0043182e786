#!/usr/bin/env python
"""The probe study: do cheap latent probes predict the downstream result of a full diffusion run?

  python scripts/probe_study.py                                   # make probe-study: 8 first stages + 2 checkpoints
  python scripts/probe_study.py --ae-steps 600 --ldm-steps 1200 --out outputs/probe_study_long

Every first stage of lab/probe_study.py's STUDY_ARMS (and early checkpoints of the first) gets the
comparison's downstream result (stage 2 on its latents, samples, FID/KID/class accuracy; --repeats) and every latent
probe (scripts/probe_latents.py). <out>/report.md: each probe's and each reconstruction metric's Spearman rank
correlation with each downstream metric, with a bootstrap 95 % interval. Re-running the command resumes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

from ldm.script_options import add_detector, check_output_dir, positive_int, setup_logging
from lab.probe_study import StudyOptions, run_study


def build_parser() -> argparse.ArgumentParser:
    d = StudyOptions()
    p = argparse.ArgumentParser(prog="scripts/probe_study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--repeats", type=positive_int, default=d.compare.repeats)
    p.add_argument("--ae-steps", type=positive_int, default=d.compare.ae_steps)
    p.add_argument("--ldm-steps", type=positive_int, default=d.compare.ldm_steps)
    p.add_argument("--seeds", default=d.compare.seeds, help="sample seeds of the downstream evaluation")
    p.add_argument("--probe-samples", type=positive_int, default=d.probe_samples)
    p.add_argument("--diffusion-steps", type=positive_int, default=d.diffusion_steps)
    p.add_argument("--jobs", type=positive_int, default=d.compare.jobs)
    add_detector(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging()
    check_output_dir(a.out, "--out")
    d = StudyOptions()
    opts = replace(d, out_dir=a.out, probe_samples=a.probe_samples, diffusion_steps=a.diffusion_steps,
                   compare=replace(d.compare, repeats=a.repeats, ae_steps=a.ae_steps, ldm_steps=a.ldm_steps,
                                   seeds=a.seeds, jobs=a.jobs, detector=a.detector))
    command = shlex.join(["python", "scripts/probe_study.py", *(sys.argv[1:] if argv is None else argv)])
    report = run_study(opts, command=command)
    print(f"\n{report.read_text()}\nreport: {report}")
    return 0


if __name__ == "__main__":
    main()

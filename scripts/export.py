"""Export a trained stage-1 autoencoder for release: ``.safetensors`` (EMA weights by default) + config sidecar.

    python scripts/export.py logs/<run> --out release/litevae_b           # -> litevae_b.safetensors + .yaml
    python scripts/cache_latents.py --ae release/litevae_b.safetensors ...  # every --ae accepts the export

Loading is strict and needs no pickle (``safetensors``); the sidecar holds the autoencoder's ``{target, params}``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.first_stage import export_first_stage  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="stage-1 run folder or a .ckpt inside one")
    p.add_argument("--out", required=True, help="output path without suffix (writes .safetensors and .yaml)")
    p.add_argument("--no-ema", action="store_true", help="export the live weights instead of the EMA copy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    weights, sidecar = export_first_stage(args.source, args.out, use_ema=not args.no_ema)
    print(f"wrote {weights} and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Reconstruction quality of a stage-1 autoencoder: PSNR, SSIM, LPIPS and rFID, for EMA and raw weights.

Usage and options: ``python scripts/eval_autoencoder.py --help``; the code: ``ldm/tools/commands/eval_autoencoder.py``.
"""
from ldm.tools.commands.eval_autoencoder import main

if __name__ == "__main__":
    main()

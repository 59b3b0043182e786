#!/usr/bin/env python
"""Latent diagnostics of a latent cache: per-channel statistics and the MMD² to N(0, I).

Usage and options: ``python scripts/latent_stats.py --help``; the code: ``ldm/tools/commands/latent_stats.py``.
"""
from ldm.tools.commands.latent_stats import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Latent probes of a first stage: spectrum, scale equivariance, Gaussianity, linear probe, short diffusion probe.

Usage and options: ``python scripts/probe_latents.py --help``; the code: ``ldm/tools/commands/probe_latents.py``.
"""
from ldm.tools.commands.probe_latents import main

if __name__ == "__main__":
    main()

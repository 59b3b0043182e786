#!/usr/bin/env python
"""The probe study: do cheap latent probes predict the downstream result of a full diffusion run?

Usage and options: ``python scripts/probe_study.py --help``; the code: ``ldm/tools/commands/probe_study.py``.
"""
from ldm.tools.commands.probe_study import main

if __name__ == "__main__":
    main()

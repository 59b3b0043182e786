#!/usr/bin/env python
"""Sample a trained latent diffusion model into a PNG folder, ``samples.npz`` and ``grid.png``.

Usage and options: ``python scripts/sample.py --help``; the code: ``ldm/tools/commands/sample.py``.
"""
from ldm.tools.commands.sample import main

if __name__ == "__main__":
    main()

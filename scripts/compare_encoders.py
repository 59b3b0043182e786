#!/usr/bin/env python
"""Downstream comparison of encoders (LiteVAE vs the SD-VAE baseline), end to end, in one command.

Usage and options: ``python scripts/compare_encoders.py --help``; the code: ``ldm/tools/commands/compare_encoders.py``.
"""
from ldm.tools.commands.compare_encoders import main

if __name__ == "__main__":
    main()

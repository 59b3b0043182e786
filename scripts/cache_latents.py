#!/usr/bin/env python
"""Encode an image dataset once with a trained first stage and store the latents as WebDataset shards.

Usage and options: ``python scripts/cache_latents.py --help``; the code: ``ldm/tools/commands/cache_latents.py``.
"""
from ldm.tools.commands.cache_latents import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Stage-1 ablation at an equal budget: variants of an autoencoder config, trained and evaluated alike.

Usage and options: ``python scripts/ablate_stage1.py --help``; the code: ``ldm/tools/commands/ablate_stage1.py``.
"""
from ldm.tools.commands.ablate_stage1 import main

if __name__ == "__main__":
    main()

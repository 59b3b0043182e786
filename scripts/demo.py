#!/usr/bin/env python
"""``make demo``: the whole pipeline on Fashion-MNIST 64x64 on a laptop CPU.

Usage and options: ``python scripts/demo.py --help``; the code: ``ldm/tools/commands/demo.py``.
"""
from ldm.tools.commands.demo import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""FID (and KID, precision/recall) of generated images against a reference, and the class accuracy of samples.

Usage and options: ``python scripts/eval_fid.py --help``; the code: ``ldm/tools/commands/eval_fid.py``.
"""
from ldm.tools.commands.eval_fid import main

if __name__ == "__main__":
    main()

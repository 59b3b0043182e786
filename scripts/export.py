#!/usr/bin/env python
"""Export a trained model for release: ``.safetensors`` + a config sidecar ``.yaml``.

Usage and options: ``python scripts/export.py --help``; the code: ``ldm/tools/commands/export.py``.
"""
from ldm.tools.commands.export import main

if __name__ == "__main__":
    main()

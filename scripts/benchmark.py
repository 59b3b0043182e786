#!/usr/bin/env python
"""Side-by-side speed and memory benchmarks: one table and one set of ratios from a single run.

Usage and options: ``python scripts/benchmark.py --help``; the code: ``ldm/tools/commands/benchmark.py``.
"""
from ldm.tools.commands.benchmark import main

if __name__ == "__main__":
    main()

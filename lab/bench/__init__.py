"""Benchmark suites of ``scripts/benchmark.py``, one module per topic; ``measure`` holds the timing and memory
helpers, ``common`` what the suites share."""

"""blip-tools benchmarks: scenarios B0–B7, the real-size CPU comparison, the GPU script and the soak run.

Run them with `blip-tools bench` (from a source checkout: the suite is not part of the installed package).
"""

"""Benchmarks: `python -m benchmarks.run` (make bench) or one part, e.g. `python -m benchmarks.data_bench`."""

"""Benchmark cases and timing harnesses shared by ``bench/`` (pytest-benchmark) and ``emokern bench``."""

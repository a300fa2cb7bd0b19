"""Benchmark cases and timing harnesses shared by ``bench/`` and ``emokern bench``."""

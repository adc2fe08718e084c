"""Benchmarks of mriq against baselines (not tests: CI only runs their ``--smoke`` mode)."""

"""Benchmarks: python -m tempo_ds.bench ops (see ops.py)."""

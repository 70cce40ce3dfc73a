"""Benchmarks, step profiles and audits; may import every other layer."""

"""Benchmarks: scripts that print measurements, run with python -m benchmarks.<name>."""

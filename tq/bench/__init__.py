"""Benchmarks: `tq bench` (see benchmarks/README.md)."""

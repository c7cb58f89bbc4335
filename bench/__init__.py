"""Benchmarks and the chaos run (`python -m bench.chaos`)."""

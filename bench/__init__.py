"""Benchmarks; run each as a module, e.g. `python -m bench.distill_speed`."""

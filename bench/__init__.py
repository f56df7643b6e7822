"""Benchmarks: all of them with `python -m bench`, or one as `python -m bench.<name>`
(bench/README.md)."""

"""Run the benchmarks, one after the other, and say which met their targets.

    python -m bench [--full] [--only NAME ...] [--write docs/BENCHMARKS.md]

Each benchmark is a module `bench.<name>` with `run(profile, write) -> bool` (see
bench/README.md); a module that is not there is skipped. The exit status is 1 when a target
was missed or a benchmark failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import BENCHMARKS  # in the order they run and the document shows them


def load(name: str):
    """The module `bench.<name>`, or None when there is no such module."""
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            return None
        raise  # the module is there but needs something missing: that is an error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--full", action="store_true", help="the GPU-host profile (default: the 2-core CPU one)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=", ".join(BENCHMARKS)
    )
    parser.add_argument("--write", type=Path, help="(re)write each benchmark's section here")
    args = parser.parse_args(argv)
    profile = "full" if args.full else "default"
    chosen = [n for n in BENCHMARKS if not args.only or n in args.only]

    results: list[tuple[str, str, float]] = []
    for name in chosen:
        print(f"== {name} ({profile})", flush=True)
        started = time.perf_counter()
        try:
            module = load(name)
            if module is None:
                status = "skipped (no module)"
            elif not hasattr(module, "run"):
                status = "error: no run(profile, write) entry point"
            else:
                # None counts as met: a benchmark without a target may return nothing.
                status = "missed" if module.run(profile, args.write) is False else "passed"
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            status = f"error: {type(e).__name__}: {e}"
        results.append((name, status, time.perf_counter() - started))
        print(f"== {name}: {status}", flush=True)

    print()
    for name, status, seconds in results:
        print(f"{name:<17} {status:<40} {seconds:7.0f} s")
    bad = [s for _, s, _ in results if s == "missed" or s.startswith("error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

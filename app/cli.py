"""Kept so that `python -m app.cli …` (scripts, the benchmarks) still runs the `distillery`
command: the client half lives in distillery/cli.py, the service's commands in
app/cli_server.py."""

from distillery.cli import main

if __name__ == "__main__":
    main()

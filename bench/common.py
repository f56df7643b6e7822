"""What every benchmark shares: the machine line, the command line, the date, and writing one
marked section of docs/BENCHMARKS.md (plus its plots) without touching the others."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("default", "full")
# The benchmarks, in the order `python -m bench` runs them and docs/BENCHMARKS.md shows them.
BENCHMARKS = (
    "distill_speed",
    "compression",
    "quantization",
    "quantization_accuracy",
    "distill_pays",
    "pretrained_init",
    "data_scale",
    "search",
    "service_overhead",
    "storage",
    "upload",
    "api_load",
    "api_waiting",
    "recovery",
    "dashboard",
)

DOC_INTRO = (
    "Measured numbers for Distillery, each with the command that produced it and the machine "
    "it ran on. Sections between `<!-- name:start -->` and `<!-- name:end -->` markers are "
    "rewritten by the benchmark of that name (`python -m bench --only <name> --write "
    "docs/BENCHMARKS.md`, or `python -m bench --write docs/BENCHMARKS.md` for all of them); "
    "edit the text outside them by hand."
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: object = None) -> str:
    """One line: OS, CPU, cores, torch and its threads, OpenMP settings, and the GPU when
    `device` is a CUDA device. Imports torch."""
    import torch

    env = [
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ
    ]
    parts = [
        platform.platform(),
        f"CPU {cpu_model()}",
        f"nproc {os.cpu_count()}",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} torch thread(s)",
        *env,
    ]
    if isinstance(device, torch.device) and device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    return ", ".join(parts)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them: how busy the shared
    machine was around a run (timings on a loaded machine are slower and noisier)."""
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command running now, as `python -m <module> <args>`, for a section's Command line:
    `python -m bench --only x --write ...` under the runner, `python -m bench.x ...` alone."""
    script = Path(sys.argv[0]).resolve()
    try:
        parts = list(script.relative_to(REPO).with_suffix("").parts)
    except ValueError:
        return shlex.join(["python", *sys.argv])
    if parts[-1] == "__main__":
        parts.pop()
    return shlex.join(["python", "-m", ".".join(parts), *sys.argv[1:]])


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put `body` between `name`'s markers in `path`, keeping the rest of the file.

    A new section goes before the first section of a benchmark that comes later in
    BENCHMARKS, else at the end. The file is read just before it is written, so sections other
    benchmarks wrote meanwhile survive. `body` holds the markers itself.
    """
    start, end = markers(name)
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{DOC_INTRO}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + body + tail
    else:
        later = BENCHMARKS[BENCHMARKS.index(name) + 1 :] if name in BENCHMARKS else ()
        at = min((text.index(markers(n)[0]) for n in later if markers(n)[0] in text), default=-1)
        if at >= 0:
            text = text[:at] + body + "\n\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def image_path(write: Path, name: str, what: str) -> Path:
    """Where a section's plot goes: `img/<name>_<what>.png` beside the document."""
    return write.parent / "img" / f"{name}_{what}.png"


def image_link(write: Path, image: Path) -> str:
    """The image's path relative to the document, for a Markdown link."""
    return Path(os.path.relpath(image, write.parent)).as_posix()

"""`pip install distillery` as a CI job does it: the wheel, without extras, into a fresh venv.
It must bring the client and the client half of the CLI only (no torch, no ONNX, no
SQLAlchemy), stay small, submit and wait on a job against a running service, and say which
extra a service command needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.test_wheel_install import build_wheel
from tests.service_support import TINY_SPEC

MAX_VENV_BYTES = 60 * 1024**2  # the goal of the thin install (README: measured size)


def _size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _clean_env() -> dict[str, str]:
    # Nothing of this checkout on the path: pip would take a distillery.egg-info found there
    # for an installed distillery and skip the wheel.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _thin_venv(tmp_path: Path) -> tuple[Path, float]:
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=_clean_env()
    )
    pip = subprocess.run(
        [venv / "bin/pip", "install", "--no-cache-dir", str(wheel)],
        timeout=600,
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert pip.returncode == 0, pip.stderr
    assert "Successfully installed" in pip.stdout and "distillery-0.2.0" in pip.stdout
    return venv, time.monotonic() - started


def _in_venv(venv: Path, *args: str, env: dict[str, str] | None = None, **kw):
    return subprocess.run(
        [str(a) for a in args],
        env={**_clean_env(), **(env or {})},
        cwd=venv.parent,  # not this checkout
        capture_output=True,
        text=True,
        **kw,
    )


def test_the_thin_install_is_small_has_no_ml_stack_and_submits_and_waits(served, tmp_path):
    venv, seconds = _thin_venv(tmp_path)
    size = _size(venv)
    print(f"thin install: {size / 1024**2:.1f} MB in {seconds:.1f} s")
    assert size < MAX_VENV_BYTES, f"{size / 1024**2:.1f} MB"
    python = venv / "bin/python"
    probe = _in_venv(
        venv,
        python,
        "-c",
        "import importlib.util as u, distillery; from distillery import Client, AsyncClient;"
        "print(distillery.__file__);"
        "print([m for m in ('torch', 'onnx', 'onnxruntime', 'sqlalchemy', 'fastapi', 'numpy')"
        " if u.find_spec(m)])",
    )
    assert probe.returncode == 0, probe.stderr
    where, importable = probe.stdout.splitlines()
    assert Path(where).is_relative_to(venv) and importable == "[]"

    url, key, _ = served
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps(TINY_SPEC))
    env = {"DISTILLERY_URL": url, "DISTILLERY_API_KEY": key, "GITHUB_STEP_SUMMARY": ""}
    run = _in_venv(
        venv,
        venv / "bin/distillery",
        "submit",
        spec,
        "--wait",
        "--gate",
        "final.params>0",
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "gate final.params>0:" in run.stdout and " pass" in run.stdout
    assert "stage distill succeeded" in run.stderr  # a CI log's lines

    for command, extra in (("serve", "all"), ("migrate", "server"), ("run", "worker")):
        refused = _in_venv(venv, venv / "bin/distillery", command, "x", env=env)
        assert refused.returncode == 5, refused.stderr
        assert f"pip install 'distillery[{extra}]'" in refused.stderr
        assert "Traceback" not in refused.stderr

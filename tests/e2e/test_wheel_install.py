"""`pip install .` installs a wheel, not this checkout: everything the service reads at run
time (the Alembic migrations, the dashboard's files) must be inside it. Build the wheel,
unpack it as pip would, and run `distillery serve` from it, outside the repository, until it
is ready and serves the dashboard."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
from alembic.script import ScriptDirectory

from tests.service_support import REPO, free_port, wait_until


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy (setuptools leaves build/ and *.egg-info beside
    the sources it builds), without build isolation (no network needed)."""
    src = tmp_path / "src"
    for package in ("distillery", "distillery_contract", "app", "worker"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("distillery-*.whl")
    return wheel


def test_a_wheel_install_migrates_and_serves(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = sorted((REPO / "app/migrations/versions").glob("*.py"))
    assert versions
    for name in ["app/migrations/env.py", "app/migrations/script.py.mako"] + [
        f"app/migrations/versions/{v.name}" for v in versions
    ]:
        assert name in names, sorted(names)
    static = REPO / "app/dashboard/static"
    assets = [f.relative_to(static).as_posix() for f in static.rglob("*") if f.is_file()]
    assert "js/main.js" in assets and "vendor/uplot/uPlot.iife.min.js" in assets
    missing = [a for a in assets if f"app/dashboard/static/{a}" not in names]
    assert not missing, missing  # the dashboard's every file travels in the wheel
    entry_points = zipfile.ZipFile(wheel).read("distillery-0.2.0.dist-info/entry_points.txt")
    assert b"distillery = distillery.cli:main" in entry_points

    site, run = tmp_path / "site", tmp_path / "run"
    zipfile.ZipFile(wheel).extractall(site)  # what pip does with a pure-Python wheel
    run.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "DISTILLERY_HOME": str(run / "home"),
        "DATABASE_URL": "",
        "BROKER_URL": "",
        "STORAGE_DIR": "",
        "DISTILLERY_API_KEY": "",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import app, worker; print(app.__file__); print(worker.__file__)"],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(f).is_relative_to(site) for f in where), where  # not this checkout

    port = free_port()
    log = open(run / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=run,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError((run / "serve.log").read_text())
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 120, what="distillery serve from the wheel")
        base = f"http://127.0.0.1:{port}"
        assert "<title>Distillery</title>" in httpx.get(f"{base}/").text
        for asset in assets:
            assert httpx.get(f"{base}/dashboard/{asset}").status_code == 200, asset
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    head = ScriptDirectory(str(REPO / "app/migrations")).get_current_head()  # this checkout's
    with sqlite3.connect(run / "home" / "distillery.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"jobs", "tenants", "api_keys"} <= tables, tables

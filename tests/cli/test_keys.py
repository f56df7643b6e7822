"""`distillery keys` works on the service's database or says where it looked: run in a folder
where no service lives, it once made a new ./.distillery/distillery.db and printed a key the
running service then refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from app.core.migrate import upgrade
from app.testing import postgres_database
from tests.service_support import REPO, cli

# No service settings from the environment the tests run in: the defaults a user gets.
BARE = {"DISTILLERY_HOME": "", "DATABASE_URL": "", "BROKER_URL": "", "STORAGE_DIR": ""}


def _keys(*args: str, cwd: Path, **settings: str) -> tuple[int, str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**BARE, **settings, "PYTHONPATH": path}
    proc = cli("keys", *args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), err.decode()


def test_keys_create_in_a_folder_without_a_service_refuses(tmp_path):
    code, out, err = _keys("create", "--tenant", "acme", cwd=tmp_path)
    assert code != 0 and "dk_" not in out
    assert str(tmp_path / ".distillery") in err  # where it looked
    assert "DISTILLERY_HOME" in err and "distillery serve" in err  # how to point it
    assert "Traceback" not in err
    assert not (tmp_path / ".distillery").exists()  # and nothing made there
    code, _, err = _keys("revoke", "dk_whatever", cwd=tmp_path)
    assert code != 0 and str(tmp_path / ".distillery") in err


def test_keys_create_finds_the_home_it_is_pointed_at(tmp_path):
    home = tmp_path / "service-home"
    home.mkdir()
    upgrade(f"sqlite:///{home / 'distillery.db'}")  # as serve leaves it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = _keys("create", "--tenant", "acme", cwd=elsewhere, DISTILLERY_HOME=str(home))
    assert code == 0, err
    assert out.strip().startswith("dk_") and str(home / "distillery.db") in err
    code, out, err = _keys("revoke", out.strip(), cwd=elsewhere, DISTILLERY_HOME=str(home))
    assert code == 0 and out.strip() == "revoked", err


def test_keys_create_on_a_database_without_the_schema_says_migrate(tmp_path):
    with postgres_database() as url:
        code, out, err = _keys("create", "--tenant", "acme", cwd=tmp_path, DATABASE_URL=url)
    assert code != 0 and "dk_" not in out
    assert "distillery migrate" in err and "Traceback" not in err

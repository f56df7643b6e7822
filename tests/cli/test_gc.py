"""`distillery gc` as an operator runs it: a subprocess on the service's settings (here an
embedded SQLite home), listing what retention would delete, then deleting it."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.core.db import Database
from app.core.migrate import upgrade
from app.models import Dataset, Job, Tenant, utcnow
from app.services import tenants
from tests.service_support import TINY_SPEC, cli


@pytest.fixture
def home(tmp_path):
    """A home with one job that ended 40 days ago (two files), one that ended yesterday, a
    dataset uploaded 40 days ago that no job used, and one uploaded yesterday."""
    home = tmp_path / "home"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'distillery.db'}")
    upgrade(db.url)
    now = utcnow()
    with db.session() as s:
        tenants.create_key(s, tenant_name="ops")
    with db.session() as s:
        tenant = s.scalar(select(Tenant).where(Tenant.name == "ops"))
        ids = {}
        for name, days in (("old", 40), ("new", 1)):
            job = Job(
                tenant_id=tenant.id,
                name=name,
                spec=TINY_SPEC,
                queue="default",
                status="succeeded",
                started_at=now - timedelta(days=days, hours=1),
                finished_at=now - timedelta(days=days),
            )
            s.add(job)
            s.flush()
            ids[name] = job.id
            folder = home / "storage" / "jobs" / job.id
            folder.mkdir(parents=True)
            (folder / "model.onnx").write_bytes(b"m" * 2048)
            (folder / "report.json").write_bytes(b"{}")
        for name, days in (("old_ds", 40), ("new_ds", 1)):
            ds = Dataset(
                tenant_id=tenant.id,
                filename="d.npz",
                kind="npz",
                path="",
                bytes=1000,
                sha256="0" * 64,
                num_samples=20,
                num_classes=2,
                input_shape=[1, 8, 8],
                class_names=["0", "1"],
                created_at=now - timedelta(days=days),
            )
            s.add(ds)
            s.flush()
            ds.path = f"uploads/{tenant.id}/datasets/{ds.id}/d.npz"
            (home / "storage" / ds.path).parent.mkdir(parents=True)
            (home / "storage" / ds.path).write_bytes(b"d" * 1000)
            ids[name] = ds.id
    db.dispose()
    return home, ids


def _gc(home, *args: str, **env: str) -> tuple[int, str, str]:
    settings = {
        "DISTILLERY_HOME": str(home),
        "DATABASE_URL": "",
        "STORAGE_URL": "",
        "STORAGE_DIR": "",
        "ARTIFACT_TTL_DAYS": "",
        "UPLOAD_TTL_DAYS": "",
        **env,
    }
    p = cli("gc", *args, env=settings, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def test_gc_dry_run_lists_what_would_go_and_deletes_nothing(home):
    home, ids = home
    code, out, err = _gc(home, "--dry-run", ARTIFACT_TTL_DAYS="30", UPLOAD_TTL_DAYS="30")
    assert code == 0, err
    assert out.splitlines() == [
        f"job      {ids['old']}  tenant ops  ended 40.0 days ago  2 files  2.0 KB",
        f"dataset  {ids['old_ds']}  tenant ops  uploaded 40.0 days ago  1000 B",
        "would delete: the files of 1 job(s), 1 upload(s); 3.0 KB (dry run: nothing was deleted)",
    ]
    storage = home / "storage"
    assert (storage / "jobs" / ids["old"] / "model.onnx").is_file()
    assert list((storage / "uploads").rglob(ids["old_ds"]))


def test_gc_deletes_what_the_dry_run_listed_and_options_override_the_settings(home):
    home, ids = home
    # The settings would keep everything for a year; the options say 30 days.
    code, out, err = _gc(
        home,
        "--json",
        "--artifact-ttl-days",
        "30",
        "--upload-ttl-days",
        "30",
        ARTIFACT_TTL_DAYS="365",
    )
    assert code == 0, err
    done = json.loads(out)
    assert [j["id"] for j in done["jobs"]] == [ids["old"]]
    assert [(u["kind"], u["id"]) for u in done["uploads"]] == [("dataset", ids["old_ds"])]
    assert done["bytes"] == 2050 + 1000 and done["dry_run"] is False
    storage = home / "storage"
    assert not (storage / "jobs" / ids["old"]).exists()
    assert (storage / "jobs" / ids["new"] / "model.onnx").is_file()
    assert not list((storage / "uploads").rglob(ids["old_ds"]))
    assert list((storage / "uploads").rglob(ids["new_ds"]))
    code, out, _ = _gc(home, "--dry-run", ARTIFACT_TTL_DAYS="30", UPLOAD_TTL_DAYS="30")
    assert out.splitlines()[-1].startswith("would delete: the files of 0 job(s), 0 upload(s)")


def test_gc_without_a_ttl_says_retention_is_off(home):
    home, _ = home
    code, out, err = _gc(home, "--dry-run")
    assert code == 5 and out == ""
    assert err.startswith("error [retention_off]: set ARTIFACT_TTL_DAYS")

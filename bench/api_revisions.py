"""The api_load rows of two revisions of the code, measured side by side in one run.

`python -m bench.api_load` compares today's numbers with a table written on another day, when
the shared machine may have been faster or slower. This runs the API of a base revision (a
git worktree of it) and of this checkout at once, each on a database of its own filled alike
(10,000 jobs, COPYed in by bench.api_load's fill, which both schemas accept), and loads the
same cells of each with wrk in turns (forwards, then backwards, per round): a change in the
machine's speed hits both alike, and the ratio says whether the code got slower.

    python -m bench.api_revisions --base a5df1ca [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.testing import PG_ADMIN, REDIS_URL, REPO, postgres_database
from bench.api_load import (
    DEEP_PAGE,
    GET_ONE,
    LUA_COMMON,
    LUA_POST,
    MID,
    POST_ONE,
    PROFILES,
    Cell,
    Db,
    Load,
    deep_cursor,
    grow,
    lua,
    run_cells,
    sample_ids,
    server_env,
)
from bench.common import load_average
from bench.servers import api_server, base_env


@dataclass(frozen=True)
class Revision:
    label: str
    tree: Path  # the checkout whose code runs
    commit: str


@contextmanager
def worktree(rev: str) -> Iterator[Revision]:
    """A detached worktree of `rev`, removed afterwards."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = Path(tempfile.mkdtemp(prefix=f"distillery-rev-{commit}-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), commit],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    try:
        yield Revision("base", path, commit)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
        shutil.rmtree(path, ignore_errors=True)


def head() -> Revision:
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    return Revision("head", REPO, out.stdout.strip())


def in_tree(rev: Revision, code: str, env: dict[str, str]) -> str:
    """Run `code` with the revision's own modules; its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=rev.tree, env=env, check=True, capture_output=True
    )
    return out.stdout.decode().strip()


@contextmanager
def database(rev: Revision, env: dict[str, str]) -> Iterator[Db]:
    """A new database migrated by the revision's code, one tenant and its key made by it."""
    with postgres_database(PG_ADMIN, prefix="distillery_rev") as url:
        renv = {**env, "DATABASE_URL": url}
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=rev.tree,
            env=renv,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        made = in_tree(
            rev,
            "import json, os\n"
            "from app.core.db import Database\nfrom app.models import Tenant\n"
            "from app.services import tenants\n"
            "db = Database(os.environ['DATABASE_URL'])\n"
            "with db.session() as s:\n"
            "    key = tenants.create_key(s, tenant_name='bench')\n"
            "    tid = s.query(Tenant.id).filter(Tenant.name == 'bench').scalar()\n"
            "print(json.dumps([key, tid]))",
            renv,
        )
        key, tenant_id = json.loads(made.splitlines()[-1])
        yield Db(url.rsplit("/", 1)[1], url, url.replace("+psycopg", ""), tenant_id, key)


def post_script(rev: Revision, key: str, path: Path) -> tuple[Path, dict]:
    """wrk's POST script with the revision's own TINY_SPEC (its spec may know fewer fields)."""
    spec = in_tree(
        rev, "import json; from app.testing import TINY_SPEC; print(json.dumps(TINY_SPEC))", {}
    )
    path.write_text(LUA_COMMON.replace("__KEY__", key) + LUA_POST.replace("__BODY__", spec))
    return path, json.loads(spec)


def measure(base: Revision, rounds: int, tmp: Path) -> dict[str, dict[str, Load]]:
    profile = PROFILES["default"]
    profile = type(profile)(**{**profile.__dict__, "rounds": rounds})
    env = base_env()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    revisions = [base, head()]
    cells: list[Cell] = []
    with ExitStack() as stack:
        for rev in revisions:
            db = stack.enter_context(database(rev, env))
            fill_s = grow(db, MID)
            print(f"{rev.label} {rev.commit}: {db.jobs:,} jobs in {fill_s:.1f} s", flush=True)
            senv = server_env(env, db, REDIS_URL, queue, tmp)
            server = stack.enter_context(
                api_server(senv, 1, tmp / f"api-{rev.label}.log", cwd=rev.tree)
            )
            ids = tmp / f"ids-{rev.label}.lua"
            ids.write_text(lua("rotate", db.key, sample_ids(db, 2000)))
            deep = f"/v1/jobs?limit=20&after={deep_cursor(db)}"
            plain = tmp / f"plain-{rev.label}.lua"
            plain.write_text(lua("plain", db.key))
            post, spec = post_script(rev, db.key, tmp / f"post-{rev.label}.lua")
            cells += [
                Cell(GET_ONE, server, db, None, ids, profile.connections),
                Cell(GET_ONE, server, db, None, ids, 1),
                Cell(POST_ONE, server, db, "/v1/jobs", post, profile.connections, spec),
                # A page of seeded jobs only: the POSTs add jobs of each revision's own plan.
                Cell(DEEP_PAGE, server, db, deep, plain, profile.connections),
            ]
        loads = run_cells(cells, profile, tmp)
    out: dict[str, dict[str, Load]] = {}
    for i, (cell, load) in enumerate(zip(cells, loads, strict=True)):
        key = f"{cell.endpoint} -c{cell.connections}"
        out.setdefault(key, {})[revisions[i // (len(cells) // 2)].label] = load
    return out


def table(out: dict[str, dict[str, Load]]) -> str:
    lines = [
        "| cell | base req/s | head req/s | head/base | base p50 (ms) | head p50 (ms) | "
        "base p99 (ms) | head p99 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, pair in out.items():
        b, h = pair["base"], pair["head"]
        lines.append(
            f"| {key} | {b.rps:.1f} | {h.rps:.1f} | {h.rps / b.rps:.2f}x | {b.p50_ms:.2f} | "
            f"{h.p50_ms:.2f} | {b.p99_ms:.2f} | {h.p99_ms:.2f} | {b.failed + h.failed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_revisions", description=__doc__)
    parser.add_argument("--base", required=True, help="the revision to compare with (git rev)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="distillery-api-revisions-"))
    started = load_average()
    try:
        with worktree(args.base) as base:
            out = measure(base, args.rounds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbase {args.base}, head {head().commit}; load average {started} -> {load_average()}")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

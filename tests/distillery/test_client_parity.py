"""`Client` and `AsyncClient` are two shells over one core: they expose the same methods with
the same parameters, and each method does the same against a live API (every test here runs
once with each client)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator, Iterator

import pytest

from distillery import AsyncClient, Client
from tests.api.test_artifacts import finished_job
from tests.service_support import TINY_SPEC

# The async client's name for a sync method, where the two differ (as httpx's do).
ASYNC_NAME = {"close": "aclose", "__enter__": "__aenter__", "__exit__": "__aexit__"}
# Parameters whose type (and default) is by nature the sync or the async one.
IO_PARAMETERS = {"transport", "sleep"}


def _public(cls: type) -> dict[str, object]:
    names = [n for n in dir(cls) if not n.startswith("_") or n == "__init__"]
    return {n: getattr(cls, n) for n in names if callable(getattr(cls, n))}


def _sync_spelling(annotation: object) -> object:
    if isinstance(annotation, str):
        return annotation.replace("AsyncIterator", "Iterator").replace("AsyncClient", "Client")
    return annotation


def test_both_clients_expose_the_same_methods_with_the_same_signatures():
    sync, async_ = _public(Client), _public(AsyncClient)
    assert {ASYNC_NAME.get(n, n) for n in sync} == set(async_)
    for name, method in sync.items():
        twin = async_[ASYNC_NAME.get(name, name)]
        ours, theirs = inspect.signature(method), inspect.signature(twin)
        assert list(ours.parameters) == list(theirs.parameters), name
        for p, q in zip(ours.parameters.values(), theirs.parameters.values(), strict=True):
            assert p.kind == q.kind, (name, p.name)
            if p.name not in IO_PARAMETERS:
                assert (p.default, p.annotation) == (q.default, q.annotation), (name, p.name)
        if name != "__init__":
            returns = _sync_spelling(theirs.return_annotation)
            assert ours.return_annotation == returns, name
            iterates = name in ("events", "iter_jobs")
            assert inspect.isgeneratorfunction(method) is iterates, name
            assert inspect.isasyncgenfunction(twin) is iterates, name
            assert inspect.iscoroutinefunction(twin) is not iterates, name
            assert twin.__doc__ == method.__doc__, name


@pytest.fixture(params=["sync", "async"])
def use(request, api):
    """use(tenant, method, *args, **kw): the method's answer from a Client, or an AsyncClient
    (an iterator's items as a list)."""

    def sync(tenant: str, name: str, *args, **kw):
        with Client(api.url, api.key(tenant)) as c:
            out = getattr(c, name)(*args, **kw)
            return list(out) if isinstance(out, Iterator) else out

    def async_(tenant: str, name: str, *args, **kw):
        async def main():
            async with AsyncClient(api.url, api.key(tenant)) as c:
                out = getattr(c, name)(*args, **kw)
                if isinstance(out, AsyncIterator):
                    return [item async for item in out]
                return await out

        return asyncio.run(main())

    return sync if request.param == "sync" else async_


def test_iter_jobs_pages_through_every_job(api, use):
    tenant = f"pages-{use.__name__}"
    with api.client(tenant) as c:
        made = [c.post("/v1/jobs", json=TINY_SPEC).json()["id"] for _ in range(5)]
    jobs = use(tenant, "iter_jobs", page_size=2)  # three pages: 2, 2, 1
    assert [j.id for j in jobs] == made[::-1]  # newest first
    assert [j.id for j in use(tenant, "iter_jobs", status="queued", page_size=4)] == made[::-1]
    assert use(tenant, "iter_jobs", status="running") == []


def _epoch(run: str, epoch: int) -> dict:
    return {
        **dict(stage="distill", run=run, epoch=epoch, step=10 * epoch, lr=1e-3, loss=1 / epoch),
        **dict(task_loss=0.5, kd_loss=0.25, feature_loss=None, val_accuracy=0.5, seconds=2.0),
    }


def test_history_csv_has_a_row_for_each_epoch(api, use):
    rows = [_epoch("distill", 1), _epoch("distill", 2), _epoch("finetune1", 1)]
    with api.client("history") as c:
        job_id = finished_job(api, c, {}, history=rows)
    csv = use("history", "history_csv", job_id).splitlines()
    assert csv[0].startswith("stage,run,epoch,step,lr,loss,")
    assert [line.split(",")[1:3] for line in csv[1:]] == [
        ["distill", "1"],
        ["distill", "2"],
        ["finetune1", "1"],
    ]
    assert [(r.run, r.epoch, r.loss) for r in use("history", "history", job_id)] == [
        ("distill", 1, 1.0),
        ("distill", 2, 0.5),
        ("finetune1", 1, 1.0),
    ]


def test_download_reports_progress_and_resumes_a_part_file(api, use, tmp_path):
    mib = 1 << 20
    data = bytes(range(256)) * (3 * mib // 256) + b"tail"  # 3 MiB and 4 bytes
    with api.client("download") as c:
        job_id = finished_job(
            api, c, {"model.onnx": ("onnx", data)}, **{"model.onnx": {"final": True}}
        )
    seen: list[tuple[int, int]] = []
    path = use("download", "download", job_id, dest=tmp_path, on_progress=lambda *p: seen.append(p))
    assert path == tmp_path / "model.onnx" and path.read_bytes() == data
    assert seen == [(mib, len(data)), (2 * mib, len(data)), (3 * mib, len(data)), (len(data),) * 2]

    # An earlier try cut off after its first MiB: only the rest is fetched (Range).
    dest = tmp_path / "again"
    dest.mkdir()
    (dest / "model.onnx.part").write_bytes(data[:mib])
    seen.clear()
    path = use(
        "download", "download", job_id, "model.onnx", dest, on_progress=lambda *p: seen.append(p)
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert not (dest / "model.onnx.part").exists()
    assert seen == [(2 * mib, len(data)), (3 * mib, len(data)), (len(data),) * 2]

"""The dashboard as a user drives it in Chromium, against a real `distillery serve`: sign in,
submit from the editor and watch the job finish live, read the curves, download an artifact,
see a refused spec's message at its field, cancel a running job, and another tenant's view."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

from tests.browser.conftest import PHONE
from tests.service_support import REPO, TINY_SPEC, client, keys_create, wait_for_status

TERMINAL = {"succeeded", "failed", "cancelled"}


def test_sign_in_refuses_a_wrong_key_then_keeps_the_right_one_in_the_tab_only(web, served):
    url, key, _ = served
    p = web.page
    p.goto("/")
    # The key field has the focus: a keyboard user types and presses Enter.
    assert p.evaluate("document.activeElement.id") == "api-key"
    p.keyboard.type("dk_not_a_key")
    p.keyboard.press("Enter")
    error = p.locator("#sign-in-error")
    error.wait_for()
    assert "refused this API key" in error.inner_text()
    web.shot("signin-refused", full_page=False)
    assert p.evaluate("sessionStorage.length") == 0

    p.get_by_label("API key").fill(key)
    p.keyboard.press("Enter")
    p.wait_for_selector("#jobs-body[data-loaded]", state="attached")
    assert p.evaluate("sessionStorage.getItem('distillery.apiKey')") == key
    assert key not in p.url and p.evaluate("document.cookie") == ""
    p.get_by_role("button", name="Sign out").click()
    p.get_by_label("API key").wait_for()
    assert p.evaluate("sessionStorage.length") == 0
    assert "Signed out" in p.locator(".notice").inner_text()


def test_a_job_submitted_from_the_editor_reaches_succeeded_live(web, served):
    url, key, _ = served
    p = web.page
    web.sign_in(key)
    p.get_by_role("link", name="New job").first.click()
    p.get_by_label("Start from").select_option("tiny")
    spec = json.loads(p.get_by_label("Job spec (JSON)").input_value())
    assert spec == TINY_SPEC
    p.evaluate("window.__sameDocument = true")  # gone if the page reloads
    p.get_by_role("button", name="Submit job").click()
    p.wait_for_url("**/#/jobs/job_*")
    # Every status the heading shows, in order, as the page updates itself.
    p.evaluate(
        """() => {
        window.__statuses = [];
        const seen = () => {
          const b = document.querySelector('h1 .badge');
          const s = b && b.dataset.status;
          if (s && window.__statuses.at(-1) !== s) window.__statuses.push(s);
        };
        seen();
        new MutationObserver(seen).observe(document.body, {childList: true, subtree: true});
      }"""
    )
    p.wait_for_selector("h1 .badge[data-status=succeeded]", timeout=180_000)
    statuses = p.evaluate("window.__statuses")
    assert p.evaluate("window.__sameDocument") is True
    assert "running" in statuses and statuses[-1] == "succeeded", statuses
    assert p.locator("#job-stage").inner_text() == "export"
    assert p.locator("progress[aria-label='Job progress']").get_attribute("value") == "100"
    # The results came in without a reload too: the stages, the metrics and the artifacts.
    p.locator("#artifacts tr[data-artifact='model.int8.onnx']").wait_for()
    assert (
        p.locator(".timeline .badge[data-status=succeeded]").count() == 7
    )  # data, teacher, baseline, distill, prune, quantize, export
    assert p.locator("#metrics tr[data-model=final]").count() == 1


def test_the_jobs_list_pages_filters_and_updates_itself(web, served):
    """A tenant of its own with 21 cancelled jobs: two pages of the filtered list; then a
    new job shows up at the top and reaches succeeded in the list, with no reload."""
    url = served[0]
    key = keys_create(served[2] / "home", f"lister-{uuid.uuid4().hex[:6]}")
    # On a queue no worker consumes: each stays queued until its cancel ends it (on the
    # default queue a tiny job could finish before its worker's heartbeat saw the cancel).
    parked = {**TINY_SPEC, "queue": "parked"}
    with client(url, key) as c:
        ids = []
        for k in range(21):
            ids.append(c.post("/v1/jobs", json={**parked, "name": f"queued-{k}"}).json()["id"])
            c.post(f"/v1/jobs/{ids[-1]}/cancel")
        for job_id in ids:
            ended = wait_for_status(c, job_id, TERMINAL, timeout=120)
            assert ended["status"] == "cancelled", ended
    web.sign_in(key)
    p = web.page
    p.get_by_label("Status").select_option("cancelled")
    p.wait_for_url("**/#/jobs?status=cancelled")
    rows = p.locator("#jobs-body tr")
    rows.nth(19).wait_for()
    newest_first = list(reversed(ids))
    assert [rows.nth(i).get_attribute("data-job") for i in range(20)] == newest_first[:20]
    assert p.locator("#jobs-body .badge[data-status=cancelled]").count() == 20
    p.get_by_role("button", name="Older").click()
    p.get_by_text("Page 2").wait_for()
    assert rows.count() == 1 and rows.first.get_attribute("data-job") == ids[0]
    assert p.get_by_role("button", name="Older").is_disabled()
    p.get_by_role("button", name="Newer").click()
    p.get_by_text("Page 1").wait_for()
    assert rows.count() == 20

    p.get_by_label("Status").select_option("")
    p.wait_for_url("**/#/jobs")
    p.evaluate("window.__sameDocument = true")
    with client(url, key) as c:
        fresh = c.post("/v1/jobs", json={**TINY_SPEC, "name": "fresh"}).json()["id"]
    row = p.locator(f"#jobs-body tr[data-job='{fresh}']")
    row.wait_for()
    assert rows.first.get_attribute("data-job") == fresh
    row.locator(".badge[data-status=succeeded]").wait_for(timeout=180_000)
    assert p.evaluate("window.__sameDocument") is True


def _history(served, job_id: str) -> list[dict]:
    with client(served[0], served[1]) as c:
        return c.get(f"/v1/jobs/{job_id}/history").json()["data"]


def test_the_curves_are_drawn_from_the_history(web, served, finished_job):
    rows = _history(served, finished_job["id"])
    web.sign_in(served[1])
    web.open_job(finished_job["id"])
    p = web.page
    prune = sum(r["stage"] == "prune" for r in rows)
    p.wait_for_selector(f"[data-chart=prune][data-rows='{prune}']", state="attached")
    drawn = p.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('[data-chart]')].map(el => [
          el.dataset.chart,
          {labels: el.uplot.series.map(s => s.label), data: el.uplot.data},
        ]))"""
    )
    assert list(drawn) == ["teacher", "baseline", "distill", "prune"]
    columns = {"loss": "loss", "CE": "task_loss", "KD": "kd_loss", "val accuracy": "val_accuracy"}
    for stage, chart in drawn.items():
        mine = [r for r in rows if r["stage"] == stage]
        assert chart["data"][0] == list(range(1, len(mine) + 1)), stage  # epoch, across runs
        for label, series in zip(chart["labels"][1:], chart["data"][1:], strict=True):
            assert series == [r[columns[label]] for r in mine], (stage, label)
        has_kd = stage in ("distill", "prune")
        assert chart["labels"][1:] == ["loss", "CE", *(["KD"] if has_kd else []), "val accuracy"]
    web.shot("job-succeeded")
    # The same numbers as a table for who cannot see the chart.
    p.get_by_text("distill: the numbers").click()
    cells = p.locator("[data-chart=distill] ~ details tbody tr").first.locator("td")
    first = next(r for r in rows if r["run"] == "distill")
    assert cells.nth(4).inner_text() == f"{first['loss']:.4f}"


def test_an_artifact_downloads_with_its_sha256(web, served, finished_job):
    web.sign_in(served[1])
    web.open_job(finished_job["id"])
    p = web.page
    row = p.locator("#artifacts tr[data-artifact='model.int8.onnx']")
    listed = row.locator("code.sha").inner_text()
    with p.expect_download() as info:
        row.get_by_role("button", name="Download model.int8.onnx").click()
    download = info.value
    assert download.suggested_filename == "model.int8.onnx"
    digest = hashlib.sha256(open(download.path(), "rb").read()).hexdigest()
    with client(served[0], served[1]) as c:
        api = {
            a["name"]: a for a in c.get(f"/v1/jobs/{finished_job['id']}/artifacts").json()["data"]
        }
    assert digest == listed == api["model.int8.onnx"]["sha256"]
    row.get_by_text("saved, sha256 verified").wait_for()


def test_the_results_show_each_model_against_the_teacher_and_each_gate(web, served, finished_job):
    web.sign_in(served[1])
    web.open_job(finished_job["id"])
    p = web.page
    metrics = finished_job["metrics"]
    final = p.locator("#metrics tr[data-model=final] td")
    final.first.wait_for()
    cells = [final.nth(i).inner_text() for i in range(final.count())]
    lo, hi = metrics["final"]["accuracy_ci"]
    assert cells[0] == f"{metrics['final']['accuracy']:.4f} (95% CI {lo:.4f}–{hi:.4f})"
    assert cells[1] == f"{metrics['final']['params']:,}"
    assert cells[-2] == f"{metrics['final']['size_ratio']:.1f}×"
    assert cells[-1] == f"{metrics['final']['speedup']:.1f}×"
    # A model without ratios of its own gets them against the teacher.
    pruned = p.locator("#metrics tr[data-model=pruned] td")
    ratio = metrics["teacher"]["size_bytes"] / metrics["pruned"]["size_bytes"]
    assert pruned.nth(pruned.count() - 2).inner_text() == f"{ratio:.1f}×"
    gates = p.locator("#gates tbody tr")
    assert gates.count() == 2
    by_gate = {gates.nth(i).locator("td").first.inner_text(): gates.nth(i) for i in range(2)}
    assert by_gate["final.accuracy_drop<=1"].locator("td").last.inner_text() == "✓ pass"
    size = by_gate["final.size_ratio>=1000"].locator("td")
    missed = next(g for g in finished_job["gates"] if not g["passed"])["missed_by"]
    assert size.last.inner_text() == f"✗ fail (missed by {float(f'{missed:.4g}'):g})"
    assert size.nth(1).inner_text() == f"{metrics['final']['size_ratio']:.4f}"
    assert p.locator("#gates-verdict").inner_text() == "✗ 1 of 2 gates failed"


def test_the_results_fit_a_1280_px_screen(web, served, finished_job):
    """Every column of the metrics table and each gate's whole verdict in view at 1280 px,
    none behind a scroll bar: side by side the two tables once cut off the ratios and
    "(missed by …)"."""
    web.sign_in(served[1])
    web.open_job(finished_job["id"])
    p = web.page
    assert p.viewport_size["width"] == 1280
    p.locator("#metrics tr[data-model=final]").wait_for()
    p.locator("#gates tbody tr").first.wait_for()
    overflow = """sel => [...document.querySelectorAll(sel + ' .table-wrap')].map(w => ({
        hidden: w.scrollWidth - w.clientWidth,
        cells: [...w.querySelectorAll('td, th')].filter(
            c => c.getBoundingClientRect().right > w.getBoundingClientRect().right + 1
        ).map(c => c.textContent)}))"""
    for panel in ("#metrics", "#gates"):
        (wrap,) = p.evaluate(overflow, panel)
        assert wrap == {"hidden": 0, "cells": []}, (panel, wrap)
    verdict = p.locator("#gates td.fail")
    assert "(missed by " in verdict.inner_text() and verdict.is_visible()
    smaller = p.locator("#metrics tr[data-model=final] td").nth(6)
    assert smaller.inner_text().endswith("×") and smaller.is_visible()


# A job whose worker was lost in distill and that resumed: teacher 0-19.2 s, distill
# 19.3-30.0 s, a wait for a worker, distill again 45.0-60.0 s (seconds from its start).
RESUMED = {"teacher": [(1, 0.0, 19.2)], "distill": [(1, 19.3, 30.0), (2, 45.0, 60.0)]}


def _resumed_job(served) -> str:
    """RESUMED, recorded in the served database as the service records it."""
    from app.core.db import Database
    from app.jobs import lifecycle
    from app.jobs.states import JobStatus
    from app.models import JobStage, utcnow
    from app.services import tenants

    db = Database(f"sqlite:///{served[2] / 'home' / 'distillery.db'}")
    t0 = utcnow() - timedelta(minutes=5)
    try:
        with db.session() as s:
            tenant = tenants.authenticate(s, key=served[1])
            job_id = lifecycle.create(s, tenant_id=tenant.id, name="resumed", spec=TINY_SPEC,
                                      queue="nobody-reads-this", stages=list(RESUMED),
                                      idempotency_key=None, request_hash="-").id  # fmt: skip
        with db.session() as s:
            lifecycle.claim(s, job_id=job_id, worker_id="w/1", stale_before=utcnow(),
                            max_attempts=3)  # fmt: skip
            lifecycle.finish(s, job_id=job_id, worker_id="w/1", status=JobStatus.SUCCEEDED)
        with db.session() as s:
            for name, spans in RESUMED.items():
                attempts = [
                    {"attempt": n, "started_at": (t0 + timedelta(seconds=a)).isoformat(),
                     "finished_at": (t0 + timedelta(seconds=b)).isoformat(), "seconds": b - a}
                    for n, a, b in spans
                ]  # fmt: skip
                s.execute(
                    update(JobStage)
                    .where(JobStage.job_id == job_id, JobStage.name == name)
                    .values(
                        status="succeeded",
                        attempts=attempts,
                        started_at=t0 + timedelta(seconds=spans[0][1]),
                        finished_at=t0 + timedelta(seconds=spans[-1][2]),
                        seconds=sum(b - a for _, a, b in spans),
                    )  # fmt: skip
                )
    finally:
        db.dispose()
    return job_id


def test_a_resumed_stage_is_drawn_as_its_attempts_with_the_wait_between(web, served):
    job_id = _resumed_job(served)
    web.sign_in(served[1])
    web.open_job(job_id)
    p = web.page
    p.locator("tr[data-stage=distill] .bar").first.wait_for()
    drawn = p.evaluate(
        """() => Object.fromEntries(['teacher', 'distill'].map(name => {
            const track = document.querySelector(`tr[data-stage=${name}] td.track`).getBoundingClientRect();
            return [name, [...document.querySelectorAll(`tr[data-stage=${name}] .bar`)].map(b => {
              const r = b.getBoundingClientRect();
              return [(r.left - track.left) / track.width, (r.right - track.left) / track.width];
            })];
        }))"""
    )
    # Where each attempt ran, as fractions of the job's 60 s (the track's width).
    expected = {name: [(a / 60, b / 60) for _, a, b in spans] for name, spans in RESUMED.items()}
    assert len(drawn["distill"]) == 2  # one bar per attempt
    for name, spans in expected.items():
        for (left, right), (want_left, want_right) in zip(drawn[name], spans, strict=True):
            assert abs(left - want_left) < 0.01 and abs(right - want_right) < 0.01, (name, drawn)
    duration = p.locator("tr[data-stage=distill] td.duration").inner_text()
    assert duration == "26 s (2 attempts)"  # 10.7 + 15.0 s of work, the wait not counted
    assert p.locator("tr[data-stage=teacher] td.duration").inner_text() == "19 s"


def test_the_new_job_page_offers_uploads_made_elsewhere(web, served, finished_job):
    """A dataset and a teacher uploaded with curl (not from this tab) are listed on the New job
    page and go into the spec from there: nothing to upload again."""
    with client(served[0], served[1]) as c:
        with open(REPO / "examples" / "tabular" / "wine.npz", "rb") as f:
            dataset = c.post("/v1/datasets", files={"file": ("wine.npz", f)}).json()
        onnx = c.get(f"/v1/jobs/{finished_job['id']}/artifacts/model.onnx").content
        files = {"file": ("elsewhere.onnx", onnx)}
        model = c.post("/v1/models", files=files, data={"input_shape": "1,8,8"}).json()
    web.sign_in(served[1])
    p = web.page
    p.goto("/#/submit")
    row = p.locator(f"#dataset-list li[data-id='{dataset['id']}']")
    row.wait_for()
    assert "wine.npz" in row.inner_text() and "178 samples, 3 classes" in row.inner_text()
    row.get_by_role("button", name=f"Use in spec: {dataset['id']}").click()
    spec = json.loads(p.get_by_label("Job spec (JSON)").input_value())
    assert spec["dataset"]["source"] == "upload" and spec["dataset"]["id"] == dataset["id"]
    teacher = p.locator(f"#model-list li[data-id='{model['id']}']")
    assert "elsewhere.onnx" in teacher.inner_text()
    teacher.get_by_role("button", name=f"Use as teacher: {model['id']}").click()
    spec = json.loads(p.get_by_label("Job spec (JSON)").input_value())
    assert spec["teacher"] == {"source": "upload", "id": model["id"]}


def test_a_dataset_uploaded_with_progress_goes_into_the_spec(web, served):
    web.sign_in(served[1])
    p = web.page
    p.goto("/#/submit")
    p.get_by_label("Dataset file (.npz,.zip,.tar.gz,.tgz)").set_input_files(
        str(REPO / "examples" / "tabular" / "wine.npz")
    )
    p.get_by_role("button", name="Upload dataset").click()
    status = p.locator("#dataset-status")
    status.get_by_text("Uploaded: ds_").wait_for()
    dataset_id = status.inner_text().removeprefix("Uploaded: ")
    assert p.locator("#dataset-progress").get_attribute("value") == "100"
    # The newest first: this one heads the tenant's list.
    p.locator(f"#dataset-list li[data-id='{dataset_id}']").wait_for()
    listed = p.locator("#dataset-list li").first
    assert listed.get_attribute("data-id") == dataset_id
    assert "178 samples, 3 classes" in listed.inner_text()
    listed.get_by_role("button", name=f"Use in spec: {dataset_id}").click()
    spec = json.loads(p.get_by_label("Job spec (JSON)").input_value())
    assert spec["dataset"]["source"] == "upload" and spec["dataset"]["id"] == dataset_id
    # The list is the API's: a reload of the tab, or another tab, lists it too.
    p.reload()
    p.locator("#dataset-list li code").get_by_text(dataset_id).wait_for()


def test_a_teacher_uploaded_from_the_page_becomes_the_specs_teacher(
    web, served, finished_job, tmp_path
):
    """The finished job's own ONNX model, uploaded back as a teacher through the page."""
    with client(served[0], served[1]) as c:
        onnx = c.get(f"/v1/jobs/{finished_job['id']}/artifacts/model.onnx").content
    (tmp_path / "teacher.onnx").write_bytes(onnx)
    web.sign_in(served[1])
    p = web.page
    p.goto("/#/submit")
    p.get_by_label("Teacher model file (.pt,.onnx,.safetensors)").set_input_files(
        str(tmp_path / "teacher.onnx")
    )
    p.get_by_label("Input shape (C,H,W or D)").fill("1,8,8")
    p.get_by_role("button", name="Upload model").click()
    status = p.locator("#model-status")
    status.get_by_text("Uploaded: mdl_").wait_for()
    model_id = status.inner_text().removeprefix("Uploaded: ")
    listed = p.locator(f"#model-list li[data-id='{model_id}']")
    listed.wait_for()
    assert "onnx, input [1,8,8]" in listed.inner_text()
    listed.get_by_role("button", name=f"Use as teacher: {model_id}").click()
    spec = json.loads(p.get_by_label("Job spec (JSON)").input_value())
    assert spec["teacher"] == {"source": "upload", "id": model_id}


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_a_refused_spec_shows_each_message_at_its_field(web, served):
    web.sign_in(served[1])
    p = web.page
    p.goto("/#/submit")
    spec = {**TINY_SPEC, "distill": {"epochs": -1}, "student": {"arch": "resnet9000"}}
    text = json.dumps(spec, indent=2)
    editor = p.get_by_label("Job spec (JSON)")
    editor.fill(text)
    before = _job_count(served)
    p.get_by_role("button", name="Submit job").click()
    epochs = p.locator("#spec-errors li[data-field='distill.epochs']")
    epochs.wait_for()
    assert "Input should be greater than or equal to 0" in epochs.inner_text()
    # The line it points at is the field's own line in the editor, marked in the gutter.
    line = _line_of(text, '"epochs": -1')
    assert epochs.get_attribute("data-line") == str(line)
    assert p.locator(f".gutter [data-line='{line}']").get_attribute("class") == "bad"
    # One message per field, even one with "; " inside it.
    arch = p.locator("#spec-errors li[data-field='student.arch']")
    assert "unknown arch 'resnet9000'; known: cnn_large" in arch.inner_text()
    assert arch.get_attribute("data-line") == str(_line_of(text, '"resnet9000"'))
    assert p.locator("#spec-errors li").count() == 2
    web.shot("submit-refused", full_page=False)
    # Following the message puts the cursor on that line.
    epochs.get_by_role("button").click()
    selected = p.evaluate(
        "(() => { const t = document.getElementById('spec'); return t.value.slice(t.selectionStart, t.selectionEnd); })()"
    )
    assert '"epochs": -1' in selected
    assert _job_count(served) == before  # nothing was queued


def _job_count(served) -> int:
    with client(served[0], served[1]) as c:
        return len(c.get("/v1/jobs", params={"limit": 200}).json()["data"])


def test_a_running_job_is_cancelled_from_its_page(web, served):
    url, key, _ = served
    # 1000 epochs over all 1797 digits: minutes, so it is still running when cancelled.
    teacher = {**TINY_SPEC["teacher"], "epochs": 1000}
    dataset = {"source": "builtin", "name": "digits"}
    with client(url, key) as c:
        r = c.post(
            "/v1/jobs", json={**TINY_SPEC, "name": "long", "teacher": teacher, "dataset": dataset}
        )
    assert r.status_code == 201, r.text
    job = r.json()
    try:
        web.sign_in(key)
        web.open_job(job["id"])
        p = web.page
        p.wait_for_selector("h1 .badge[data-status=running]", timeout=120_000)
        # The curve grows while it runs, from the live history events.
        p.wait_for_function(
            "() => Number(document.querySelector('[data-chart=teacher]')?.dataset.rows) >= 3",
            timeout=60_000,
        )
        web.shot("job-running")
        p.once("dialog", lambda d: d.accept())
        p.get_by_role("button", name="Cancel job").click()
        p.wait_for_selector("h1 .badge[data-status=cancelled]", timeout=60_000)
        assert p.locator("#job-error code").inner_text() == "cancelled"
        assert p.locator(".timeline tr[data-stage=teacher] .badge").inner_text() == "cancelled"
        assert p.get_by_role("button", name="Cancel job").count() == 0
    finally:
        with client(url, key) as c:
            c.post(f"/v1/jobs/{job['id']}/cancel")
            assert wait_for_status(c, job["id"], TERMINAL, timeout=60)["status"] == "cancelled"


def test_another_tenant_sees_none_of_the_first_tenants_jobs(web, served, finished_job):
    other = keys_create(served[2] / "home", f"browser-{uuid.uuid4().hex[:6]}")
    assert _job_count(served) > 0  # the first tenant has jobs to hide
    web.sign_in(other)
    p = web.page
    assert p.locator("#jobs-body tr").count() == 0
    assert p.locator("#jobs-empty").inner_text() == "No jobs yet. Submit one from New job."
    p.goto(f"/#/jobs/{finished_job['id']}")
    missing = p.locator("#job-missing")
    missing.wait_for()
    assert "does not exist, or it belongs to another tenant" in missing.inner_text()


def test_a_job_whose_files_retention_deleted_says_so_instead_of_listing_them(web, served):
    """A job that ran and ended long ago, swept by retention as the reaper would sweep it:
    its page keeps its record and says when the files went (the API answers 410 for them)."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.core.db import Database
    from app.core.storage import LocalStorage
    from app.models import Job, utcnow
    from app.services import retention

    url, key, home = served
    with client(url, key) as c:
        job = c.post("/v1/jobs", json={**TINY_SPEC, "name": "long-ago"}).json()
        c.post(f"/v1/jobs/{job['id']}/cancel")
        wait_for_status(c, job["id"], TERMINAL, timeout=60)
    db = Database(f"sqlite:///{home / 'home' / 'distillery.db'}")
    try:
        then = utcnow() - timedelta(days=40)
        with db.session() as s:  # it ran (started) and ended 40 days ago
            s.execute(
                update(Job).where(Job.id == job["id"]).values(started_at=then, finished_at=then)
            )
        done = retention.sweep(
            db, LocalStorage(home / "home" / "storage"), artifact_ttl_days=30, upload_ttl_days=None
        )
    finally:
        db.dispose()
    assert job["id"] in [j.id for j in done.jobs]
    web.sign_in(key)
    web.open_job(job["id"])
    section = web.page.locator("#artifacts")
    section.locator("p").wait_for()
    assert "by retention; the record and metrics remain" in section.inner_text()
    assert section.locator("tr[data-artifact]").count() == 0


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_every_page_fits_the_screen_and_labels_every_control(
    web, served, finished_job, finished_search, viewport
):
    if viewport == "phone":
        web.page.set_viewport_size(PHONE)
    web.sign_in(served[1])
    p = web.page
    unlabelled = """() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.textContent.trim())
        .map(el => el.outerHTML.slice(0, 80))"""
    for name, route, ready in (
        ("jobs", "/#/jobs", "#jobs-body tr"),
        ("job", f"/#/jobs/{finished_job['id']}", "#artifacts tr[data-artifact]"),
        ("search", f"/#/jobs/{finished_search['id']}", "#search-candidates tr[data-final=true]"),
        ("submit", "/#/submit", "#spec"),
    ):
        p.goto(route)
        p.locator(ready).first.wait_for()
        assert p.evaluate(unlabelled) == [], name
        # Wide tables scroll inside their box; the page itself never scrolls sideways.
        assert p.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        web.shot(f"{name}-{viewport}")


def test_the_page_is_served_with_a_strict_content_security_policy(served):
    with client(served[0], None) as c:
        page = c.get("/")
        module = c.get("/dashboard/js/main.js")
        assert c.get("/docs").status_code == 200 and c.get("/healthz").json() == {"status": "ok"}
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    scripts = re.findall(r"<script[^>]*>", page.text)
    assert scripts and all(" src=" in tag for tag in scripts)  # no inline script
    assert module.headers["content-type"].startswith("text/javascript")
    assert module.headers["content-security-policy"] == policy

"""A search job's page in Chromium against a real `distillery serve`: its branches while it
runs, then the Pareto scatters (every candidate plotted where its numbers put it, the front
and the final marked), the candidate table sorted from its headers, a front model downloaded
with its sha256."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pytest

from tests.browser.conftest import SEARCH_SPEC
from tests.service_support import client, sse_events

# Every mark of both scatters as drawn: its data, its classes, its shape and where it is on
# the screen (the centre of its box).
READ_POINTS = """() => Object.fromEntries([...document.querySelectorAll('[data-scatter]')].map(fig => [
  fig.dataset.scatter,
  [...fig.querySelectorAll('svg.scatter .pt')].map(el => {
    const box = el.getBoundingClientRect();
    return {
      key: el.dataset.key, x: Number(el.dataset.x), y: Number(el.dataset.y),
      front: el.classList.contains('front'), final: el.classList.contains('final'),
      star: el.querySelector('polygon') !== null,
      cx: box.x + box.width / 2, cy: box.y + box.height / 2,
    };
  }),
]))"""

# What the page shows each time it changes: the job's status, its branch rows and its
# candidate rows.
WATCH = """() => {
  window.__seen = [];
  const look = () => {
    const badge = document.querySelector('h1 .badge');
    window.__seen.push({
      status: badge && badge.dataset.status,
      branches: [...document.querySelectorAll('#search-branches tr[data-branch] .badge')].map(b => b.dataset.status),
      candidates: document.querySelectorAll('#search-candidates tr[data-key]').length,
    });
  };
  look();
  new MutationObserver(look).observe(document.body, {childList: true, subtree: true});
}"""


# Longer training, so that the branches take some 10 s: the candidates come in over several
# of the page's 2 s polls, the first ones well before the last.
LIVE_SPEC = {
    **SEARCH_SPEC,
    "name": "search-live",
    "distill": {**SEARCH_SPEC["distill"], "epochs": 80},
    "prune": {**SEARCH_SPEC["prune"], "finetune_epochs": 30},
}


def _api(served, job_id: str) -> tuple[dict, list[dict], dict[str, dict]]:
    with client(served[0], served[1]) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        candidates = c.get(f"/v1/jobs/{job_id}/candidates").json()["data"]
        artifacts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    return job, candidates, {a["name"]: a for a in artifacts}


def _check_scatter(points: list[dict], candidates: list[dict], x_of) -> None:
    by_key = {c["key"]: c for c in candidates}
    assert sorted(p["key"] for p in points) == sorted(by_key)  # one mark per candidate
    for p in points:
        c = by_key[p["key"]]
        assert p["x"] == x_of(c) and p["y"] == c["metrics"]["accuracy"], p["key"]
        assert p["front"] == c["on_front"] and p["final"] == c["final"], p["key"]
        assert p["star"] == c["final"], p["key"]  # the final alone is a star
    # Drawn where the numbers put it: further right the larger x, higher up the more accurate.
    for a in points:
        for b in points:
            if a["x"] < b["x"]:
                assert a["cx"] < b["cx"], (a["key"], b["key"])
            if a["y"] > b["y"]:
                assert a["cy"] < b["cy"], (a["key"], b["key"])


def test_a_search_runs_live_then_shows_its_front_with_the_final_marked(web, served):
    url, key, _ = served
    with client(url, key) as c:
        job = c.post("/v1/jobs", json=LIVE_SPEC).json()
    web.sign_in(key)
    web.open_job(job["id"])
    p = web.page
    p.evaluate("window.__sameDocument = true")
    p.evaluate(WATCH)
    p.wait_for_selector("h1 .badge[data-status=succeeded]", timeout=300_000)
    p.locator("[data-scatter=latency] svg.scatter .pt.final").wait_for(state="attached")
    assert p.evaluate("window.__sameDocument") is True
    seen = p.evaluate("window.__seen")
    # While the search ran: its branches, one running while the other waited or was done,
    # and the first candidates listed before the last were measured.
    running = [s for s in seen if s["status"] == "running"]
    assert any("running" in s["branches"] for s in running), seen
    assert any(0 < s["candidates"] < 8 for s in running), seen

    job, candidates, _ = _api(served, job["id"])
    assert len(candidates) == 8 and sum(c["final"] for c in candidates) == 1
    final = next(c for c in candidates if c["final"])
    assert final["key"] == job["metrics"]["final"]["model"]
    drawn = p.evaluate(READ_POINTS)
    _check_scatter(drawn["size"], candidates, lambda c: c["metrics"]["size_bytes"] / 1024)
    _check_scatter(drawn["latency"], candidates, lambda c: c["metrics"]["latency_ms"])
    # The branches ended, and the page says which model was chosen and why.
    statuses = p.locator("#search-branches tr[data-branch] .badge")
    assert [statuses.nth(i).inner_text() for i in range(2)] == ["succeeded", "succeeded"]
    assert p.locator("#search-count").inner_text().startswith("8 of 8 candidates measured")
    chosen = p.locator("#search-final").inner_text()
    assert final["key"] in chosen and job["metrics"]["final"]["reason"] in chosen
    legend = p.locator("[data-scatter=size] .legend").inner_text()
    front = sum(c["on_front"] for c in candidates)
    assert f"on the Pareto front ({front})" in legend and f"final: {final['key']}" in legend
    web.shot("search-succeeded")
    # The page from its top to the end of the Search panel (the README's picture).
    bottom = p.evaluate(
        "document.getElementById('search').getBoundingClientRect().bottom + scrollY"
    )
    clip = {"x": 0, "y": 0, "width": 1280, "height": bottom + 16}
    p.screenshot(path=web.shots / "search-panel.png", full_page=True, clip=clip)


def _keys(page) -> list[str]:
    rows = page.locator("#search-candidates tbody tr")
    return [rows.nth(i).get_attribute("data-key") for i in range(rows.count())]


def test_the_candidates_sort_from_their_headers_and_a_front_model_downloads(
    web, served, finished_search
):
    job, candidates, artifacts = _api(served, finished_search["id"])
    web.sign_in(served[1])
    web.open_job(job["id"])
    p = web.page
    p.locator("#search-candidates tr[data-final=true]").wait_for()
    assert _keys(p) == sorted(c["key"] for c in candidates)  # in key order at first

    size = p.get_by_role("button", name="Size", exact=True)
    header = p.locator("#search-candidates th", has=size)
    size.click()
    size_of = {c["key"]: c["metrics"]["size_bytes"] for c in candidates}
    assert _keys(p) == sorted(size_of, key=lambda k: (size_of[k], k))  # ties in key order
    assert header.get_attribute("aria-sort") == "ascending"
    # From the keyboard: the header is a button; the focus stays on it as the rows move.
    size.focus()
    p.keyboard.press("Enter")
    assert _keys(p) == sorted(size_of, key=lambda k: (-size_of[k], k))
    assert header.get_attribute("aria-sort") == "descending"
    assert p.evaluate("document.activeElement.dataset.column") == "size"

    front = [c for c in candidates if c["on_front"]]
    assert front and all(c["artifacts"] == [f"candidate-{c['key']}.onnx"] for c in front)
    for c in candidates:  # a download button for each front model, none for the others
        buttons = p.locator(f"#search-candidates tr[data-key='{c['key']}'] button")
        assert buttons.count() == (1 if c["on_front"] else 0), c["key"]
    name = front[-1]["artifacts"][0]
    row = p.locator(f"#search-candidates tr[data-key='{front[-1]['key']}']")
    with p.expect_download() as info:
        row.get_by_role("button", name=f"Download {name}").click()
    download = info.value
    assert download.suggested_filename == name
    digest = hashlib.sha256(open(download.path(), "rb").read()).hexdigest()
    assert digest == artifacts[name]["sha256"]
    row.get_by_text("saved, sha256 verified").wait_for()


def test_a_searchs_stage_line_says_how_long_its_branches_ran(web, served, finished_search):
    """The `search` stage spans the branches: its record, its stage event (what `--wait`
    prints: once "search succeeded (0.0s)") and its line on the page all say how long."""
    job = finished_search
    stage = next(s for s in job["stages"] if s["name"] == "search")
    span = datetime.fromisoformat(stage["finished_at"]) - datetime.fromisoformat(
        stage["started_at"]
    )
    assert stage["seconds"] is not None and stage["seconds"] > 1.0  # branches train for seconds
    assert stage["seconds"] == pytest.approx(span.total_seconds(), abs=0.01)
    with client(served[0], served[1]) as c:
        events = sse_events(c, job["id"])
    (ended,) = [d for k, d in events if k == "stage" and d["stage"] == "search"]
    assert ended["status"] == "succeeded" and ended["seconds"] == pytest.approx(stage["seconds"])
    web.sign_in(served[1])
    web.open_job(job["id"])
    cell = web.page.locator("tr[data-stage=search] td.duration")
    cell.wait_for()
    seconds = stage["seconds"]
    shown = f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"  # dom.js's fmtDuration
    assert cell.inner_text() == shown

"""A job's int8 sensitivity on its page in Chromium against a real `distillery serve`: one bar
per node scored, most sensitive first, each as long as the accuracy it recovered, the nodes
the job kept in float marked; and no such panel on a job that scored none."""

from __future__ import annotations

from tests import factories
from tests.browser.conftest import _run
from tests.e2e.test_accuracy_control import _spec
from tests.service_support import client

READ_BARS = """() => [...document.querySelectorAll('#sensitivity svg.bars .bar')].map(el => {
  const box = el.querySelector('rect').getBoundingClientRect();
  return {node: el.dataset.node, recovered: Number(el.dataset.recovered),
          kept: el.classList.contains('kept'), top: box.y, width: box.width};
})"""


def _upload(c, route: str, path) -> str:
    with open(path, "rb") as f:
        r = c.post(route, files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_the_sensitivity_bars_rank_the_nodes_and_mark_those_kept_in_float(
    web, served, tmp_path, finished_job
):
    with client(served[0], served[1]) as c:
        rows = _upload(c, "/v1/datasets", factories.outlier_npz(tmp_path / "rows.npz"))
        model = _upload(c, "/v1/models", factories.outlier_teacher(tmp_path / "t.onnx"))
    spec = _spec({"source": "upload", "id": rows}, {"source": "upload", "id": model})
    job = _run(served, {**spec, "name": "outlier"}, timeout=120)
    ranking = next(s for s in job["stages"] if s["name"] == "quantize")["metrics"]["sensitivity"]

    web.sign_in(served[1])
    web.open_job(job["id"])
    p = web.page
    p.wait_for_selector("#sensitivity svg.bars .bar")
    bars = p.evaluate(READ_BARS)
    assert [b["node"] for b in bars] == [r["node"] for r in ranking] == ["hidden1", "hidden2"]
    assert [b["recovered"] for b in bars] == [r["recovered"] for r in ranking]
    assert bars[0]["top"] < bars[1]["top"]  # most sensitive on top
    assert bars[0]["width"] > 50 and bars[1]["width"] < 1  # ~67 points against none
    assert [b["kept"] for b in bars] == [True, False]  # hidden1 went back to float
    summary = p.locator("#sensitivity-summary").inner_text()
    assert "2 nodes scored, 2 kept in float (60.0% of the quantizable weights)" in summary
    assert "budget +0.00 pt met" in summary
    label = p.locator("#sensitivity svg.bars").get_attribute("aria-label")
    assert label.startswith("int8 sensitivity of 2 nodes") and "hidden1 +68.42 pt" in label
    web.shot("job-sensitivity")

    # a job that scored no node has no such panel
    web.open_job(finished_job["id"])
    p.wait_for_selector("#metrics")
    assert p.locator("#sensitivity").count() == 0

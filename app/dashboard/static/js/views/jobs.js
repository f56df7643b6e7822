// The jobs list: status, stage, progress, age, name; a status filter; cursor pages as the API
// gives them (newest first); refreshed every few seconds while the tab is visible.

import { getJSON } from "../api.js";
import { fmtAge, h, progressBar, replace, statusBadge, table } from "../dom.js";

const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const REFRESH_MS = 3000;
const PAGE_SIZES = [20, 50, 100];

function row(job) {
  return h("tr", { dataset: { job: job.id } },
    h("td", { class: "name" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name)),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, job.stage || ""),
    h("td", {}, progressBar(job.progress, `Progress of ${job.name}`)),
    h("td", { title: job.created_at }, h("time", { datetime: job.created_at }, fmtAge(job.created_at))),
    h("td", {}, h("code", {}, job.id)));
}

// Update the rows in place when the same jobs come back, so focus and scroll stay put.
function patch(tbody, jobs) {
  const ids = jobs.map((j) => j.id).join();
  if (tbody.dataset.ids !== ids) {
    replace(tbody, jobs.map(row));
    tbody.dataset.ids = ids;
    return;
  }
  jobs.forEach((job, i) => {
    const tr = tbody.rows[i];
    const cells = [...row(job).cells];
    // Cell by cell, leaving the name's link (the focusable part) where it is.
    for (let c = 1; c < cells.length; c++) tr.cells[c].replaceWith(cells[c]);
  });
}

export function jobsView(root, { params }) {
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const limit = PAGE_SIZES.includes(Number(params.get("limit"))) ? Number(params.get("limit")) : 20;
  const cursors = [null]; // `after` of each page seen; the last is the current page
  let timer = null;
  let stopped = false;

  const filter = h("select", { id: "status-filter", onchange: () => go({ status: filter.value }) },
    h("option", { value: "" }, "all"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const size = h("select", { id: "page-size", onchange: () => go({ limit: size.value }) },
    PAGE_SIZES.map((n) => h("option", { value: n, selected: n === limit }, String(n))));
  const tbody = h("tbody", { id: "jobs-body" });
  const tableEl = table(["Name", "Status", "Stage", "Progress", "Age", "ID"], [], { caption: "Jobs, newest first" });
  tableEl.querySelector("tbody").replaceWith(tbody);
  const empty = h("p", { class: "muted", id: "jobs-empty", hidden: true });
  const error = h("p", { class: "error-text", role: "alert" });
  const newer = h("button", { type: "button", onclick: () => page(-1), disabled: true }, "Newer");
  const older = h("button", { type: "button", onclick: () => page(1), disabled: true }, "Older");
  const where = h("span", { class: "muted", "aria-live": "polite" });

  function go(change) {
    const next = new URLSearchParams({ status, limit, ...change });
    if (!next.get("status")) next.delete("status");
    if (Number(next.get("limit")) === 20) next.delete("limit");
    const query = next.toString();
    location.hash = `#/jobs${query ? `?${query}` : ""}`;
  }

  let nextAfter = null;
  async function load() {
    clearTimeout(timer);
    const after = cursors[cursors.length - 1];
    const query = new URLSearchParams({ limit });
    if (status) query.set("status", status);
    if (after) query.set("after", after);
    try {
      const pageData = await getJSON(`/v1/jobs?${query}`);
      if (stopped) return;
      error.textContent = "";
      patch(tbody, pageData.data);
      nextAfter = pageData.next_after;
      empty.hidden = pageData.data.length > 0;
      empty.textContent = status ? `No ${status} jobs.` : "No jobs yet. Submit one from New job.";
      newer.disabled = cursors.length === 1;
      older.disabled = !pageData.has_more;
      where.textContent = `Page ${cursors.length}`;
      if (!tbody.dataset.loaded) {
        tbody.dataset.loaded = "true";
        performance.mark("jobs-rendered"); // bench/dashboard.py reads this
      }
    } catch (e) {
      if (stopped) return;
      error.textContent = `Could not load jobs: ${e.message}`;
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }

  function refresh() {
    if (document.visibilityState === "visible") load();
    else timer = setTimeout(refresh, REFRESH_MS);
  }

  function page(step) {
    if (step > 0 && nextAfter) cursors.push(nextAfter);
    if (step < 0 && cursors.length > 1) cursors.pop();
    load();
  }

  replace(root,
    h("div", { class: "view-head" },
      h("h1", {}, "Jobs"),
      h("div", { class: "controls" },
        h("label", { for: "status-filter" }, "Status"), filter,
        h("label", { for: "page-size" }, "Per page"), size,
        h("a", { class: "button primary", href: "#/submit" }, "New job"))),
    error, tableEl, empty,
    h("nav", { class: "pager", "aria-label": "Pages" }, newer, where, older));
  document.title = "Jobs · Distillery";
  load();
  return () => { stopped = true; clearTimeout(timer); };
}

// One job: summary and cancel, error, stage timeline, training curves, results (a search's
// front and candidates, metrics, gates), artifacts. Live over the job's event stream until it
// ends; a search's branches, whose events are their own, are polled while it runs.
//
// The page is a list of sections, and "results" a grid of panels (RESULT_PANELS).

import { ApiError, getJSON, postJSON, streamEvents } from "../api.js";
import { stageChart } from "../charts.js";
import { sensitivityOf, sensitivityPanel } from "../sensitivity.js";
import {
  announce, fmtBytes, fmtDuration, fmtInt, fmtNum, fmtTime, h, progressBar, replace, statusBadge, table,
} from "../dom.js";
import { artifactsTable } from "./artifacts.js";
import { searchPanel } from "./search.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MODELS = ["teacher", "baseline", "student", "pruned", "quantized", "final"];
const TRAINING_STAGES = ["teacher", "baseline", "distill", "prune"];
const SEARCH_POLL_MS = 2000;

// A search itself; its branches carry the same spec and a parent_id.
const isSearch = (job) => Boolean(job.spec?.search) && !job.parent_id;

// --- summary --------------------------------------------------------------------------------

function summary(job, ctx) {
  const cancellable = job.status === "queued" || job.status === "running";
  const cancel = h("button", {
    type: "button", class: "danger", id: "cancel-job",
    disabled: !cancellable, onclick: () => ctx.cancel(),
  }, job.status === "cancelling" ? "Cancelling…" : "Cancel job");
  ctx.progress = progressBar(job.progress, "Job progress");
  ctx.stageText = h("span", { id: "job-stage" }, job.stage || "—");
  return [
    h("div", { class: "view-head" },
      h("h1", {}, job.name, " ", statusBadge(job.status)),
      TERMINAL.has(job.status) ? null : h("div", { class: "controls" }, cancel)),
    h("dl", { class: "facts" }, [
      ["Stage", ctx.stageText],
      ["Progress", ctx.progress],
      ["Created", fmtTime(job.created_at)],
      ["Finished", job.finished_at ? fmtTime(job.finished_at) : "—"],
      ["ID", h("code", {}, job.id)],
      ["Queue", job.queue],
      ["Attempts", String(job.attempts)],
      job.parent_id ? ["Branch of search", h("a", { href: `#/jobs/${encodeURIComponent(job.parent_id)}`, id: "parent-search" }, h("code", {}, job.parent_id))] : null,
    ].filter(Boolean).map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value)))),
  ];
}

function errorBox(job) {
  if (!job.error) return null;
  return h("div", { class: "error-box", role: "alert", id: "job-error" },
    h("strong", {}, "Error "), h("code", { class: "code" }, job.error.code), ": ", job.error.message);
}

// --- stage timeline -------------------------------------------------------------------------

// A stage's spans on the timeline: one per attempt (a stage a lost worker cut short ran
// again: two bars with the wait between), or its start to its end.
function spans(s, now) {
  const at = (t) => (t ? Date.parse(t) : now);
  if (s.attempts?.length) return s.attempts.map((a) => ({ start: at(a.started_at), end: at(a.finished_at), attempt: a.attempt }));
  return s.started_at ? [{ start: at(s.started_at), end: at(s.finished_at), attempt: null }] : [];
}

function timeline(job) {
  const now = Date.now();
  const all = job.stages.flatMap((s) => spans(s, now));
  const origin = all.length ? Math.min(...all.map((p) => p.start)) : now;
  const span = Math.max(...all.map((p) => p.end), origin + 1) - origin;
  const rows = job.stages.map((s) => {
    const parts = spans(s, now);
    const start = parts.length ? parts[0].start : null;
    // Running: the time so far; else as recorded (every attempt's time, the waits excluded).
    const seconds = s.status === "running" || s.seconds === null
      ? (parts.length ? parts.reduce((t, p) => t + (p.end - p.start), 0) / 1000 : null)
      : s.seconds;
    const bars = parts.map((p, i) => {
      const bar = h("span", { class: `bar s-${i < parts.length - 1 ? "interrupted" : s.status}` });
      bar.style.left = `${((p.start - origin) / span) * 100}%`;
      bar.style.width = `${Math.max(((p.end - p.start) / span) * 100, 0.5)}%`;
      return bar;
    });
    const retried = parts.length > 1 ? h("span", { class: "muted" }, ` (${parts.length} attempts)`) : "";
    return h("tr", { dataset: { stage: s.name, attempts: String(parts.length) } },
      h("th", { scope: "row" }, s.name),
      h("td", {}, statusBadge(s.status)),
      h("td", {}, start === null ? "—" : `+${fmtDuration((start - origin) / 1000)}`),
      h("td", { class: "duration" }, seconds === null ? "—" : fmtDuration(seconds), retried),
      h("td", { class: "track", "aria-hidden": "true" }, ...bars));
  });
  return table(["Stage", "State", "Start", "Duration", "Timeline"], rows, { className: "timeline" });
}

// --- results: metrics and gates --------------------------------------------------------------

function interval(m) {
  const ci = m.accuracy_ci;
  if (!ci) return null;
  const [lo, hi] = Array.isArray(ci) ? ci : [ci.low ?? ci.lo, ci.high ?? ci.hi];
  return h("span", { class: "ci" }, ` (95% CI ${fmtNum(lo)}–${fmtNum(hi)})`);
}

function metricsPanel(job) {
  const m = job.metrics || {};
  const teacher = m.teacher;
  const rows = MODELS.filter((k) => m[k]).map((k) => {
    const x = m[k];
    const own = k === "final";
    const drop = own ? x.accuracy_drop : teacher && k !== "teacher" ? teacher.accuracy - x.accuracy : null;
    const size = own ? x.size_ratio : teacher && k !== "teacher" ? teacher.size_bytes / x.size_bytes : null;
    const speed = own ? x.speedup : teacher && k !== "teacher" ? teacher.latency_ms / x.latency_ms : null;
    return h("tr", { dataset: { model: k } },
      h("th", { scope: "row" }, own && x.model ? `final (${x.model})` : k),
      h("td", {}, fmtNum(x.accuracy), interval(x)),
      h("td", {}, fmtInt(x.params)),
      h("td", {}, fmtBytes(x.size_bytes)),
      h("td", {}, `${fmtNum(x.latency_ms, 3)} ms`),
      h("td", {}, drop === null ? "" : `${(drop * 100).toFixed(2)} pt`),
      h("td", {}, size === null ? "" : `${size.toFixed(1)}×`),
      h("td", {}, speed === null ? "" : `${speed.toFixed(1)}×`));
  });
  const body = rows.length
    ? table(["Model", "Accuracy", "Params", "Size", "Latency", "Accuracy drop", "Smaller", "Faster"], rows,
      { caption: "Measured on ONNX Runtime (CPU, batch 1); drop and ratios against the teacher", className: "metrics" })
    : h("p", { class: "muted" }, "No model measured yet.");
  return h("section", { class: "panel", id: "metrics", "aria-labelledby": "metrics-title" },
    h("h2", { id: "metrics-title" }, "Metrics"), body);
}

function gatesPanel(job) {
  const gates = job.gates || [];
  let body;
  if (gates.length) {
    const verdict = job.gates_passed
      ? h("p", { class: "pass", id: "gates-verdict" }, "✓ Every gate passed")
      : h("p", { class: "fail", id: "gates-verdict" }, `✗ ${gates.filter((g) => !g.passed).length} of ${gates.length} gates failed`);
    body = [verdict, table(["Gate", "Value", "Verdict"], gates.map((g) => h("tr", {},
      h("td", {}, h("code", {}, g.gate)),
      h("td", {}, g.value === null ? "not measured" : fmtNum(g.value)),
      h("td", { class: g.passed ? "pass" : "fail" }, g.passed ? "✓ pass" : "✗ fail",
        g.missed_by !== null && g.missed_by !== undefined
          ? h("span", { class: "ci" }, ` (missed by ${Number(g.missed_by.toPrecision(4))})`) : null))))];
  } else {
    const asked = Object.entries(job.spec?.gates || {}).filter(([, v]) => v !== null);
    body = h("p", { class: "muted" }, asked.length
      ? `${asked.map(([k, v]) => `${k} ${v}`).join(", ")}: checked when the ${job.parent_id ? "search" : "job"} succeeds.`
      : "This spec sets no gates.");
  }
  return h("section", { class: "panel", id: "gates", "aria-labelledby": "gates-title" },
    h("h2", { id: "gates-title" }, "Gates"), body);
}

// A search's panel is made once and updated in place (see refresh), so a refresh keeps the
// table's sort and the focus inside it.
function searchResult(job, ctx) {
  if (!isSearch(job)) return null;
  ctx.search ??= searchPanel();
  return ctx.search.element;
}

// Made once: a quantize stage's ranking does not change after the stage ends.
function sensitivityResult(job, ctx) {
  if (!sensitivityOf(job)) return null;
  ctx.sensitivity ??= sensitivityPanel(job);
  return ctx.sensitivity;
}

export const RESULT_PANELS = [searchResult, metricsPanel, gatesPanel, sensitivityResult];

// Put the panels in `box`, leaving in place those already there (a focused element that is
// taken out of the page loses the focus).
function placePanels(box, panels) {
  const keep = new Set(panels);
  for (const old of [...box.children]) if (!keep.has(old)) old.remove();
  panels.forEach((panel, i) => {
    if (box.children[i] !== panel) box.insertBefore(panel, box.children[i] ?? null);
  });
}

// --- the page -------------------------------------------------------------------------------

function mergeRow(rows, row) {
  // As the service stores them: a row replaces its run's rows from its epoch on.
  return [...rows.filter((r) => !(r.run === row.run && r.epoch >= row.epoch)), row];
}

export function jobView(root, { id }) {
  const abort = new AbortController();
  const path = `/v1/jobs/${encodeURIComponent(id)}`;
  const ctx = {
    job: null, history: [], charts: new Map(), progress: null, stageText: null,
    search: null, sensitivity: null, artifacts: new Map(),
  };
  const parts = {
    summary: h("div", {}), error: h("div", {}),
    timeline: h("section", { "aria-labelledby": "timeline-title" }),
    curves: h("section", { id: "curves", "aria-labelledby": "curves-title" }),
    results: h("div", { class: "results" }),
    artifacts: h("section", { id: "artifacts", "aria-labelledby": "artifacts-title", hidden: true }),
  };
  const chartsBox = h("div", { class: "charts" });
  const noCurves = h("p", { class: "muted" }, "No epoch finished yet.");
  replace(parts.curves, h("h2", { id: "curves-title" }, "Training curves"),
    h("p", { class: "muted" }, "Mean loss parts per epoch (left axis) and accuracy on the validation split after each epoch (right axis)."),
    noCurves, chartsBox);
  replace(root, Object.values(parts));

  function drawCurves() {
    for (const stage of TRAINING_STAGES) {
      const rows = ctx.history.filter((r) => r.stage === stage);
      if (!rows.length) continue;
      if (!ctx.charts.has(stage)) {
        const chart = stageChart(stage, rows);
        ctx.charts.set(stage, chart);
        chartsBox.append(chart.element);
      } else {
        ctx.charts.get(stage).update(rows);
      }
    }
    noCurves.hidden = ctx.history.length > 0;
  }

  function render(job) {
    const was = ctx.job?.status;
    ctx.job = job;
    document.title = `${job.name} · Distillery`;
    replace(parts.summary, summary(job, ctx));
    replace(parts.error, errorBox(job));
    replace(parts.timeline, h("h2", { id: "timeline-title" }, "Stages"), timeline(job));
    placePanels(parts.results, RESULT_PANELS.map((panel) => panel(job, ctx)).filter(Boolean));
    // A search's front comes before its (many) training curves.
    if (ctx.search && parts.curves.previousElementSibling !== parts.results) parts.results.after(parts.curves);
    if (was && was !== job.status) announce(`Job ${job.status}`);
  }

  // A search's candidates, asked for after the job itself: an ended job's list is then final.
  async function loadCandidates(job) {
    if (!isSearch(job)) return;
    const { data } = await getJSON(`${path}/candidates`, { signal: abort.signal });
    ctx.search.update(job, data, ctx.artifacts);
  }

  async function refresh() {
    const [job, history] = await Promise.all([getJSON(path), getJSON(`${path}/history`)]);
    // Rows only grow while a job runs: a reply shorter than what the event stream has added
    // since it was asked for is the older of the two.
    if (history.data.length >= ctx.history.length || TERMINAL.has(job.status)) ctx.history = history.data;
    render(job);
    drawCurves();
    if (TERMINAL.has(job.status)) await loadArtifacts();
    await loadCandidates(job);
    return job;
  }

  async function loadArtifacts() {
    // Retention deleted the files (the API answers 410 for them); the record stays.
    const expired = ctx.job?.artifacts_expired_at;
    const data = expired ? [] : (await getJSON(`${path}/artifacts`)).data;
    ctx.artifacts = new Map(data.map((a) => [a.name, a]));
    replace(parts.artifacts, h("h2", { id: "artifacts-title" }, "Artifacts"), expired
      ? h("p", { class: "muted" }, `Deleted on ${fmtTime(expired)} by retention; the record and metrics remain.`)
      : artifactsTable(data));
    parts.artifacts.hidden = false;
  }

  // A running search: its branches' progress and candidates, which its own event stream does
  // not carry. The summary is redrawn only when the status or stage changed (redrawing it
  // would take the focus off the Cancel button).
  let poll = null;
  function pollSearch() {
    clearTimeout(poll);
    if (abort.signal.aborted || !ctx.job || !isSearch(ctx.job) || TERMINAL.has(ctx.job.status)) return;
    poll = setTimeout(async () => {
      try {
        if (!document.hidden) await pollOnce();
      } catch { /* the next poll tries again */ }
      pollSearch();
    }, SEARCH_POLL_MS);
  }

  async function pollOnce() {
    const job = await getJSON(path, { signal: abort.signal });
    if (TERMINAL.has(job.status)) { await refresh(); return; }
    if (job.status !== ctx.job.status || job.stage !== ctx.job.stage) render(job);
    else {
      ctx.job = job;
      replace(ctx.progress, ...progressBar(job.progress, "Job progress").childNodes);
      replace(parts.timeline, h("h2", { id: "timeline-title" }, "Stages"), timeline(job));
    }
    await loadCandidates(job);
  }

  let pending = null;
  function refreshSoon() {
    clearTimeout(pending);
    pending = setTimeout(() => refresh().catch(() => {}), 250);
  }

  function onEvent(event) {
    const d = event.data;
    if (event.type === "history") {
      ctx.history = mergeRow(ctx.history, d);
      drawCurves();
    } else if (event.type === "progress" && ctx.job && d.progress !== undefined) {
      replace(ctx.progress, ...progressBar(d.progress, "Job progress").childNodes);
      ctx.stageText.textContent = d.stage || "—";
      replace(parts.timeline, h("h2", { id: "timeline-title" }, "Stages"), timeline(ctx.job));
    } else if (event.type === "end") {
      clearTimeout(pending);
      refresh().catch(() => {});
    } else if (["status", "stage", "metrics"].includes(event.type)) {
      refreshSoon();
    }
  }

  ctx.cancel = async () => {
    if (!confirm(`Cancel job ${ctx.job.name}? A running job stops at its next batch.`)) return;
    try {
      render(await postJSON(`${path}/cancel`));
    } catch (e) {
      announce(`Could not cancel: ${e.message}`);
      refreshSoon();
    }
  };

  refresh().then((job) => {
    if (!TERMINAL.has(job.status)) streamEvents(id, onEvent, { signal: abort.signal });
    pollSearch();
  }).catch((e) => {
    const text = e instanceof ApiError && e.status === 404
      ? `No job ${id} here: it does not exist, or it belongs to another tenant.`
      : `Could not load job ${id}: ${e.message}`;
    replace(root, h("h1", {}, "Job not found"), h("p", { class: "error-text", role: "alert", id: "job-missing" }, text),
      h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
  });

  return () => {
    abort.abort();
    clearTimeout(pending);
    clearTimeout(poll);
    ctx.search?.destroy();
    for (const chart of ctx.charts.values()) chart.destroy();
  };
}

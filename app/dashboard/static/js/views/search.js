// A search job's panel: its branches (live while they run), the Pareto scatters (accuracy
// against size and against latency) and the candidate table, sortable by any column.
//
// The panel is one element for the page's life: a refresh updates it in place, and what had
// the focus in it (a sort button, a download button, a branch link) has it again afterwards.

import { fmtBytes, fmtNum, h, progressBar, replace, statusBadge, table } from "../dom.js";
import { scatter } from "../scatter.js";
import { downloadButton } from "./artifacts.js";

const has = (v) => v !== null && v !== undefined;

function studentLabel(student) {
  if (student === null) return "the teacher itself (no student)";
  if (!student) return "";
  const kwargs = Object.entries(student.arch_kwargs || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
  return [student.arch, ...kwargs].join(" ");
}

const recipe = (a) => `T ${a["distill.temperature"]} · α ${a["distill.alpha"]}`;
const pruning = (a) => (a["prune.amount"] ? `${a["prune.method"] ?? ""} ${a["prune.amount"]}`.trim() : "none");
const quantizer = (a) =>
  (a["quantize.method"] ?? "float") + (a["quantize.calibration"] ? ` (${a["quantize.calibration"]})` : "");

// The value, and its interval under it in the same units (`unit` written once).
function withInterval(value, ci, fmt, unit = "") {
  if (!has(value)) return "";
  return [`${fmt(value)}${unit}`, ci ? h("span", { class: "ci" }, ` (${fmt(ci[0])}–${fmt(ci[1])}${unit})`) : null];
}

const points = (v) => (v * 100).toFixed(2);

// Registry names may break after their underscores (int8_dynamic, max_accuracy_drop), never
// inside a word: the table stays narrow enough for a laptop.
const breakable = (text) => String(text).split("_").flatMap((part, i) => (i ? ["_", h("wbr"), part] : [part]));

function gatesCell(c) {
  if (c.gates_passed === null || c.gates_passed === undefined) return h("span", { class: "muted", title: "checked when the search ends" }, "—");
  if (c.gates_passed) return h("span", { class: "pass" }, "✓ pass");
  const missed = (c.gates || []).filter((g) => !g.passed)
    .map((g) => h("span", { class: "ci" }, breakable(g.name ?? g.gate), has(g.missed_by) ? ` by ${Number(g.missed_by.toPrecision(3))}` : ""));
  return [h("span", { class: "fail" }, "✗ missed"), missed];
}

const objectiveOf = (job) => job.spec?.search?.objective ?? job.spec?.objective;

// The latency the front was computed on: batch 32 when that is the objective.
function latencyOf(job) {
  return objectiveOf(job) === "latency_b32"
    ? { metric: "latency_b32_ms", label: "latency, batch 32 (ms, log scale)", head: "Latency b32" }
    : { metric: "latency_ms", label: "latency, batch 1 (ms, log scale)", head: "Latency" };
}

// Columns: header, the value sorted on (a number, a string or a list of them; null sorts
// last), the cell.
function columns(latency, artifacts) {
  return [
    { id: "key", head: "Key", value: (c) => c.key, cell: (c) => h("code", {}, c.key) },
    { id: "student", head: "Student", wrap: true, value: (c) => studentLabel(c.axes.student), cell: (c) => studentLabel(c.axes.student) },
    { id: "recipe", head: "Recipe", value: (c) => [c.axes["distill.temperature"], c.axes["distill.alpha"]], cell: (c) => recipe(c.axes) },
    { id: "prune", head: "Prune", wrap: true, value: (c) => [c.axes["prune.amount"], c.axes["prune.method"] ?? ""], cell: (c) => pruning(c.axes) },
    { id: "quantizer", head: "Quantizer", wrap: true, value: (c) => quantizer(c.axes), cell: (c) => breakable(quantizer(c.axes)) },
    { id: "accuracy", head: "Accuracy", value: (c) => c.metrics.accuracy, cell: (c) => withInterval(c.metrics.accuracy, c.metrics.accuracy_ci, fmtNum) },
    { id: "drop", head: "Drop", value: (c) => c.metrics.accuracy_drop, cell: (c) => withInterval(c.metrics.accuracy_drop, c.metrics.accuracy_drop_ci, points, " pt") },
    { id: "size", head: "Size", value: (c) => c.metrics.size_bytes, cell: (c) => fmtBytes(c.metrics.size_bytes) },
    { id: "latency", head: latency.head, value: (c) => c.metrics[latency.metric], cell: (c) => `${fmtNum(c.metrics[latency.metric], 3)} ms` },
    { id: "front", head: "Front", value: (c) => Number(c.on_front), cell: (c) => (c.on_front ? ["●", h("span", { class: "visually-hidden" }, " on the front")] : "") },
    { id: "final", head: "Final", value: (c) => Number(c.final), cell: (c) => (c.final ? ["★", h("span", { class: "visually-hidden" }, " the final model")] : "") },
    { id: "gates", head: "Gates", wrap: true, value: (c) => (has(c.gates_passed) ? Number(c.gates_passed) : null), cell: gatesCell },
    {
      id: "artifacts", head: "Model", cell: (c) => c.artifacts.map((name) => (artifacts.has(name)
        ? h("span", { class: "dl" }, downloadButton(artifacts.get(name), name.split(".").pop().toUpperCase()))
        : h("span", { class: "muted" }, name))),
    },
  ];
}

function compare(a, b) {
  if (!has(a) || !has(b)) return has(a) ? -1 : has(b) ? 1 : 0;
  if (Array.isArray(a)) return a.reduce((order, v, i) => order || compare(v, b[i]), 0);
  return typeof a === "string" ? a.localeCompare(b) : a - b;
}

function sortCandidates(candidates, column, direction) {
  const sign = direction === "descending" ? -1 : 1;
  return [...candidates].sort((a, b) => {
    const va = column.value(a);
    const vb = column.value(b);
    // Nulls last either way; ties in key order.
    const order = has(va) && has(vb) ? sign * compare(va, vb) : compare(va, vb);
    return order || a.key.localeCompare(b.key);
  });
}

// Rebuild `box`'s content with `build()`, giving the focus back to what had it (by data-focus).
function keepingFocus(box, build) {
  const had = box.contains(document.activeElement) ? document.activeElement.dataset.focus : null;
  replace(box, build());
  if (had) box.querySelector(`[data-focus="${CSS.escape(had)}"]`)?.focus();
}

function branchesTable(job) {
  const students = job.spec?.search?.student ?? [job.spec?.student];
  if (!job.branches.length) return h("p", { class: "muted" }, "The branches start once the teacher is trained.");
  return table(["Branch", "Student", "Status", "Progress", "Attempts", "Error"], job.branches.map((b) => h("tr", { dataset: { branch: b.branch } },
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(b.id)}`, dataset: { focus: `branch:${b.id}` } }, `branch ${b.branch}`)),
    h("td", {}, studentLabel(students[b.branch])),
    h("td", {}, statusBadge(b.status)),
    h("td", {}, progressBar(b.progress, `Progress of branch ${b.branch}`)),
    h("td", {}, String(b.attempts)),
    h("td", { class: "name" }, b.error ? [h("code", {}, b.error.code), `: ${b.error.message}`] : ""))), { className: "branches" });
}

function summaryLine(job, candidates) {
  const total = job.candidates_total;
  const made = `${candidates.length}${has(total) ? ` of ${total}` : ""} candidates measured`;
  const final = job.metrics?.final;
  const objective = objectiveOf(job);
  return [
    h("p", { id: "search-count" }, made, objective ? `; objective: ${objective}` : ""),
    final?.model ? h("p", { id: "search-final" }, "Final: ", h("code", {}, final.model), final.reason ? ` — ${final.reason}` : "") : null,
  ];
}

function scatters(latency, pick) {
  const describe = (c) => `${c.key}: accuracy ${fmtNum(c.metrics.accuracy)}, ${fmtBytes(c.metrics.size_bytes)}, `
    + `${fmtNum(c.metrics[latency.metric], 3)} ms${c.on_front ? ", on the front" : ""}${c.final ? ", final" : ""}`;
  const summary = (what) => (cs) => {
    const final = cs.find((c) => c.final);
    return `Accuracy against ${what}: ${cs.length} candidates, ${cs.filter((c) => c.on_front).length} on the Pareto front`
      + `${final ? `, final ${final.key}` : ""}. The candidate table below has every number.`;
  };
  return [
    scatter({
      id: "size", title: "Accuracy against size", xLabel: "size (KB, log scale)",
      xOf: (c) => c.metrics.size_bytes / 1024, describe, summary: summary("size"),
    }, pick),
    scatter({
      id: "latency", title: "Accuracy against latency", xLabel: latency.label,
      xOf: (c) => c.metrics[latency.metric], describe, summary: summary("latency"),
    }, pick),
  ];
}

// The candidate table in `box`; a header's button sorts by its column (again: the other way).
function candidatesTable(box) {
  const sort = { column: "key", direction: "ascending" };
  let last = null;

  function header(col) {
    if (!col.value) return h("th", { scope: "col" }, col.head);
    const on = sort.column === col.id;
    const next = on && sort.direction === "ascending" ? "descending" : "ascending";
    return h("th", { scope: "col", "aria-sort": on ? sort.direction : "none" },
      h("button", {
        type: "button", class: "sort", dataset: { focus: `sort:${col.id}`, column: col.id },
        onclick: () => { Object.assign(sort, { column: col.id, direction: next }); draw(...last); },
      }, col.head, h("span", { class: "arrow", "aria-hidden": "true" }, on ? (sort.direction === "ascending" ? " ▲" : " ▼") : "")));
  }

  function row(c, cols) {
    return h("tr", {
      tabindex: -1, class: c.final ? "is-final" : c.on_front ? "is-front" : null,
      dataset: { key: c.key, front: String(c.on_front), final: String(c.final) },
    }, cols.map((k) => h("td", { class: k.wrap ? "wrap" : null, dataset: { col: k.id } }, k.cell(c))));
  }

  function draw(job, candidates, artifacts) {
    last = [job, candidates, artifacts];
    const cols = columns(latencyOf(job), artifacts);
    const col = cols.find((c) => c.id === sort.column) ?? cols[0];
    keepingFocus(box, () => (candidates.length
      ? h("div", { class: "table-wrap" }, h("table", { class: "candidates" },
        h("caption", {}, "Every candidate as measured on ONNX Runtime (CPU), with 95% intervals; the drop is against the teacher, in points. Sort by a column with its header."),
        h("thead", {}, h("tr", {}, cols.map(header))),
        h("tbody", {}, sortCandidates(candidates, col, sort.direction).map((c) => row(c, cols)))))
      : h("p", { class: "muted" }, "No candidate measured yet.")));
  }

  return { draw };
}

export function searchPanel() {
  const head = h("div", {});
  const branches = h("div", { id: "search-branches" });
  const charts = h("div", { class: "charts", id: "search-charts" });
  const candidatesBox = h("div", { id: "search-candidates" });
  const element = h("section", { class: "panel search", id: "search", "aria-labelledby": "search-title" },
    h("h2", { id: "search-title" }, "Search"), head,
    h("h3", {}, "Branches"), branches,
    h("h3", {}, "Pareto front"), charts,
    h("h3", {}, "Candidates"), candidatesBox);
  const table = candidatesTable(candidatesBox);
  let plots = null;
  let latencyMetric = null;
  let drawn = "";

  // A click on a mark: its row in the table.
  function pick(key) {
    const row = candidatesBox.querySelector(`tr[data-key="${CSS.escape(key)}"]`);
    row?.scrollIntoView({ block: "nearest" });
    row?.focus();
  }

  function update(job, candidates, artifacts = new Map()) {
    const phase = job.status === "succeeded" ? "chosen" : ["failed", "cancelled"].includes(job.status) ? "stopped" : "running";
    const signature = JSON.stringify([job.status, job.branches, job.metrics?.final?.model, candidates, [...artifacts.keys()]]);
    if (signature === drawn) return;
    drawn = signature;
    replace(head, summaryLine(job, candidates));
    keepingFocus(branches, () => branchesTable(job));
    const latency = latencyOf(job);
    if (!plots || latency.metric !== latencyMetric) {
      plots?.forEach((p) => p.destroy());
      plots = scatters(latency, pick);
      latencyMetric = latency.metric;
      replace(charts, plots.map((p) => p.element));
    }
    charts.hidden = !candidates.length;
    for (const p of plots) p.update({ candidates, teacher: job.metrics?.teacher?.accuracy ?? null, phase });
    table.draw(job, candidates, artifacts);
  }

  return { element, update, destroy: () => plots?.forEach((p) => p.destroy()) };
}

// int8 sensitivity, drawn as SVG bars like the Pareto scatter: one bar per node scored by the
// quantize stage (most sensitive first), its length the accuracy the node recovered when it
// alone went back to float, in points; the nodes the job kept in float filled darker. Each bar
// carries its node and values (data-node, data-recovered, data-snr), which the tests read.

import { h, table } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const ROW = 22;
const M = { top: 8, right: 64, bottom: 34, left: 8 };
const MAX_BARS = 20; // the rest are in the table below and in sensitivity.csv
const LABEL_CHARS = 34;

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

const pt = (v) => `${v >= 0 ? "+" : ""}${(v * 100).toFixed(2)} pt`;
// A long ONNX name keeps its end: "…/features.0.0/Conv" says more than its start.
const short = (name) => (name.length > LABEL_CHARS ? `…${name.slice(-(LABEL_CHARS - 1))}` : name);

export function sensitivityOf(job) {
  const stage = (job.stages || []).find((st) => st.name === "quantize");
  const rows = stage?.metrics?.sensitivity;
  if (!rows?.length) return null;
  return { rows, kept: new Set(stage.metrics.float_nodes || []), share: stage.metrics.float_share, control: stage.metrics.accuracy_control };
}

function draw(rows, kept, width) {
  const label = Math.min(260, Math.floor(width * 0.42));
  const values = rows.map((r) => r.recovered);
  const lo = Math.min(0, ...values);
  const hi = Math.max(...values, lo + 0.01); // all zero: still a scale, bars of no length
  const x0 = M.left + label;
  const span = width - x0 - M.right;
  const x = (v) => x0 + ((v - lo) / (hi - lo)) * span;
  const height = M.top + rows.length * ROW + M.bottom;
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "bars" });
  const g = s("g");
  rows.forEach((r, i) => {
    const y = M.top + i * ROW;
    const a = x(Math.min(0, r.recovered));
    const b = x(Math.max(0, r.recovered));
    g.append(s("g", {
      class: kept.has(r.node) ? "bar kept" : "bar",
      "data-node": r.node, "data-recovered": r.recovered, "data-snr": r.snr_db, "data-rank": r.rank,
    },
    s("title", {}, `${r.node} (${r.op_type}): ${pt(r.recovered)} recovered in float, SNR ${r.snr_db.toFixed(1)} dB${kept.has(r.node) ? ", kept in float" : ""}`),
    s("text", { class: "tick", x: x0 - 6, y: y + ROW / 2, "text-anchor": "end", "dominant-baseline": "middle" }, short(r.node)),
    s("rect", { x: a, y: y + 4, width: Math.max(b - a, 0), height: ROW - 8 }),
    s("text", { class: "tick", x: b + 4, y: y + ROW / 2, "dominant-baseline": "middle" }, pt(r.recovered))));
  });
  const bottom = M.top + rows.length * ROW;
  g.append(
    s("line", { class: "frame", x1: x(0), x2: x(0), y1: M.top, y2: bottom }),
    s("text", { class: "label", x: x0 + span / 2, y: bottom + 24, "text-anchor": "middle" },
      "accuracy recovered with the node alone in float (validation sample)"));
  svg.append(g);
  return svg;
}

function numbers(rows, kept) {
  return table(["Rank", "Node", "Op", "Recovered", "Drop vs float", "SNR dB", "In float"], rows.map((r) => h("tr", { dataset: { node: r.node } },
    h("td", {}, r.rank), h("td", {}, h("code", {}, r.node)), h("td", {}, r.op_type),
    h("td", {}, pt(r.recovered)), h("td", {}, pt(r.accuracy_drop)), h("td", {}, r.snr_db.toFixed(1)),
    h("td", {}, kept.has(r.node) ? "yes" : ""))), { className: "numbers" });
}

// The panel for a job whose quantize stage scored its nodes, else null.
export function sensitivityPanel(job) {
  const found = sensitivityOf(job);
  if (!found) return null;
  const { rows, kept, share, control } = found;
  const shown = rows.slice(0, MAX_BARS);
  const plot = h("div", { class: "bars-box", dataset: { chart: "sensitivity" } });
  const summary = [
    `${rows.length} nodes scored, ${kept.size} kept in float`,
    share !== undefined ? ` (${(share * 100).toFixed(1)}% of the quantizable weights)` : "",
    control ? `; accuracy budget ${pt(control.budget)} ${control.met ? "met" : "missed"} (${pt(control.val_accuracy_drop)} on validation)` : "",
  ].join("");
  const aria = `int8 sensitivity of ${rows.length} nodes, most sensitive first: `
    + shown.slice(0, 5).map((r) => `${r.node} ${pt(r.recovered)}`).join(", ");
  let drawn = 0;
  const redraw = () => {
    drawn = Math.max(plot.clientWidth || 0, 320);
    const svg = draw(shown, kept, drawn);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", aria);
    plot.replaceChildren(svg);
  };
  new ResizeObserver(() => { if (Math.abs((plot.clientWidth || 0) - drawn) > 4) redraw(); }).observe(plot);
  queueMicrotask(redraw);
  return h("section", { class: "panel sensitivity", id: "sensitivity", "aria-labelledby": "sensitivity-title" },
    h("h2", { id: "sensitivity-title" }, "int8 sensitivity"),
    h("p", { class: "muted", id: "sensitivity-summary" }, summary),
    h("figure", { class: "curves" }, plot,
      h("ul", { class: "legend" },
        h("li", {}, h("span", { class: "bar-swatch kept", "aria-hidden": "true" }), "kept in float"),
        h("li", {}, h("span", { class: "bar-swatch", "aria-hidden": "true" }), "int8"))),
    h("details", {}, h("summary", {}, "every node scored"), numbers(rows, kept)));
}

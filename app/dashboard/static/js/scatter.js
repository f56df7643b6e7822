// A search's Pareto scatter, drawn as SVG: accuracy (y) against size or latency (x, log scale),
// one mark per candidate. Shape tells them apart as well as colour: a hollow circle, a filled
// circle on the front, a star for the final. Each mark carries its candidate's key and values
// (data-key, data-x, data-y), which the table links to and the tests read.

import { h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const HEIGHT = 270;
const M = { top: 14, right: 18, bottom: 46, left: 58 };

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * mag).find((step) => step >= raw * 0.999);
}

export function linearTicks(lo, hi, count) {
  const step = niceStep(hi - lo, count);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

// Within less than a decade and a half, evenly spaced values read best; across decades 1-2-5,
// thinned to what the width holds.
export function logTicks(lo, hi, count) {
  if (hi / lo < 30) return linearTicks(lo, hi, count).filter((v) => v > 0);
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of [1, 2, 5]) {
      const v = Number((m * 10 ** e).toPrecision(12));
      if (v >= lo && v <= hi) ticks.push(v);
    }
  }
  const every = Math.ceil(ticks.length / Math.max(count, 2));
  return ticks.filter((v, i) => i % every === 0 || Math.log10(v) % 1 === 0);
}

const fmtTick = (v) => String(Number(v.toPrecision(3)));

// A log domain around the values (a lone value or equal ones get a factor 1.5 either side).
function logDomain(values) {
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  if (!(hi > lo)) return [lo / 1.5, hi * 1.5];
  const pad = Math.max((Math.log10(hi) - Math.log10(lo)) * 0.08, 0.02);
  return [lo / 10 ** pad, hi * 10 ** pad];
}

function accuracyDomain(values) {
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const pad = Math.max((hi - lo) * 0.1, 0.02);
  return [Math.max(0, lo - pad), Math.min(1, hi + pad)];
}

function star(r) {
  const points = [];
  for (let i = 0; i < 10; i++) {
    const a = (Math.PI / 5) * i - Math.PI / 2;
    const rr = i % 2 ? r * 0.45 : r;
    points.push(`${(rr * Math.cos(a)).toFixed(2)},${(rr * Math.sin(a)).toFixed(2)}`);
  }
  return s("polygon", { points: points.join(" ") });
}

function mark(c) {
  if (c.final) return star(9);
  return s("circle", { r: c.on_front ? 5.5 : 4.5 });
}

function axes(g, { width, x, y, xTicks, yTicks, xLabel, yLabel }) {
  const bottom = HEIGHT - M.bottom;
  for (const v of yTicks) {
    g.append(s("line", { class: "grid", x1: M.left, x2: width - M.right, y1: y(v), y2: y(v) }),
      s("text", { class: "tick", x: M.left - 6, y: y(v), "text-anchor": "end", "dominant-baseline": "middle" }, fmtTick(v)));
  }
  for (const v of xTicks) {
    g.append(s("line", { class: "grid", y1: M.top, y2: bottom, x1: x(v), x2: x(v) }),
      s("text", { class: "tick", x: x(v), y: bottom + 16, "text-anchor": "middle" }, fmtTick(v)));
  }
  g.append(
    s("rect", { class: "frame", x: M.left, y: M.top, width: width - M.left - M.right, height: bottom - M.top }),
    s("text", { class: "label", x: (M.left + width - M.right) / 2, y: HEIGHT - 8, "text-anchor": "middle" }, xLabel),
    s("text", { class: "label", transform: `translate(14 ${(M.top + bottom) / 2}) rotate(-90)`, "text-anchor": "middle" }, yLabel));
}

function draw({ width, candidates, teacher, xOf, xLabel, describe, onPick }) {
  const ys = candidates.map((c) => c.metrics.accuracy);
  const [x0, x1] = logDomain(candidates.map(xOf));
  const [y0, y1] = accuracyDomain(teacher === null ? ys : [...ys, teacher]);
  const x = (v) => M.left + ((Math.log10(v) - Math.log10(x0)) / (Math.log10(x1) - Math.log10(x0))) * (width - M.left - M.right);
  const y = (v) => M.top + (1 - (v - y0) / (y1 - y0)) * (HEIGHT - M.top - M.bottom);
  const svg = s("svg", { width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, class: "scatter" });
  const g = s("g");
  axes(g, {
    width, x, y, xLabel, yLabel: "accuracy (test split)",
    xTicks: logTicks(x0, x1, Math.floor((width - M.left - M.right) / 55)),
    yTicks: linearTicks(y0, y1, 5),
  });
  if (teacher !== null) g.append(s("line", { class: "teacher", x1: M.left, x2: width - M.right, y1: y(teacher), y2: y(teacher) }));
  // The final on top of the front, the front on top of the rest.
  const order = [...candidates].sort((a, b) => (a.final - b.final) || (a.on_front - b.on_front));
  for (const c of order) {
    const cls = ["pt mark", c.on_front ? "front" : "", c.final ? "final" : ""].filter(Boolean).join(" ");
    const point = s("g", {
      class: cls, transform: `translate(${x(xOf(c)).toFixed(2)} ${y(c.metrics.accuracy).toFixed(2)})`,
      "data-key": c.key, "data-x": xOf(c), "data-y": c.metrics.accuracy,
      "data-front": String(c.on_front), "data-final": String(c.final),
    }, s("title", {}, describe(c)), mark(c));
    point.addEventListener("click", () => onPick(c.key));
    g.append(point);
  }
  svg.append(g);
  return svg;
}

// `phase`: "running", "chosen" (the front and the final are known) or "stopped" (the search
// ended without choosing: failed or cancelled).
function legend(candidates, teacher, phase) {
  const swatch = (c) => s("svg", { width: 20, height: 20, viewBox: "-10 -10 20 20", "aria-hidden": "true" },
    s("g", { class: `mark ${c.on_front ? "front" : ""} ${c.final ? "final" : ""}` }, mark(c)));
  const final = candidates.find((c) => c.final);
  const front = candidates.filter((c) => c.on_front).length;
  return h("ul", { class: "legend" },
    h("li", {}, swatch({}), `candidate (${candidates.length})`),
    phase === "chosen" ? h("li", {}, swatch({ on_front: true }), `on the Pareto front (${front})`) : null,
    final ? h("li", {}, swatch({ on_front: true, final: true }), `final: ${final.key}`) : null,
    teacher !== null ? h("li", {}, h("span", { class: "teacher-swatch", "aria-hidden": "true" }), `teacher accuracy ${teacher.toFixed(4)}`) : null,
    phase === "chosen" ? null : h("li", { class: "muted" }, phase === "stopped"
      ? "no front: the search ended without choosing"
      : "the front and the final are marked when the search ends"));
}

// `spec`: {id, title, xLabel, xOf(candidate), describe(candidate), summary(candidates)}.
// update({candidates, teacher, phase}) redraws; a click on a mark calls onPick(key).
export function scatter(spec, onPick) {
  const plot = h("div", { class: "scatter-box" });
  const caption = h("figcaption", {}, spec.title);
  const figure = h("figure", { class: "curves", dataset: { scatter: spec.id } }, caption, plot, h("div"));
  let state = null;
  let drawnWidth = 0;

  function redraw() {
    if (!state || !state.candidates.length) return;
    drawnWidth = Math.max(plot.clientWidth || 0, 260);
    const svg = draw({ width: drawnWidth, ...state, ...spec, onPick });
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", spec.summary(state.candidates));
    plot.replaceChildren(svg);
    figure.lastChild.replaceWith(legend(state.candidates, state.teacher, state.phase));
    figure.dataset.points = String(state.candidates.length);
  }

  const resize = new ResizeObserver(() => {
    if (Math.abs((plot.clientWidth || 0) - drawnWidth) > 4) redraw();
  });
  resize.observe(plot);

  return {
    element: figure,
    update(next) { state = next; redraw(); },
    destroy() { resize.disconnect(); },
  };
}

// Training curves: one uPlot chart per stage, drawn from the job's history rows (the loss
// parts on the left axis, validation accuracy on the right), with the numbers as a table.

import { fmtNum, h, replace, table } from "./dom.js";

export const SERIES = [
  { key: "loss", label: "loss", stroke: "#1f4e99", width: 2 },
  { key: "task_loss", label: "CE", stroke: "#c2410c", dash: [6, 4] },
  { key: "kd_loss", label: "KD", stroke: "#7c3aed" },
  { key: "feature_loss", label: "feature", stroke: "#0f766e" },
  { key: "val_accuracy", label: "val accuracy", stroke: "#15803d", scale: "acc", width: 2 },
];
const HEIGHT = 240;

const has = (v) => v !== null && v !== undefined;

// x is the epoch within the stage, counting on across its runs (prune's fine-tune steps).
export function chartData(rows) {
  const present = SERIES.filter((s) => rows.some((r) => has(r[s.key])));
  const data = [rows.map((_, i) => i + 1), ...present.map((s) => rows.map((r) => (has(r[s.key]) ? r[s.key] : null)))];
  return { present, data };
}

function options(present, width) {
  return {
    width,
    height: HEIGHT,
    scales: { x: { time: false }, acc: { range: [0, 1] } },
    axes: [
      { label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, // whole epochs
      { label: "loss", scale: "y" },
      ...(present.some((s) => s.scale === "acc") ? [{ label: "accuracy", scale: "acc", side: 1, grid: { show: false } }] : []),
    ],
    series: [
      { label: "epoch" },
      ...present.map((s) => ({
        label: s.label, stroke: s.stroke, width: s.width || 1.5, dash: s.dash,
        scale: s.scale || "y", points: { show: true, size: 4 }, spanGaps: true,
        value: (_, v) => fmtNum(v),
      })),
    ],
  };
}

function numbers(rows) {
  const head = ["run", "epoch", "step", "lr", "loss", "CE", "KD", "feature", "val acc", "seconds"];
  return table(head, rows.map((r) => h("tr", {},
    h("td", {}, r.run), h("td", {}, r.epoch), h("td", {}, r.step),
    h("td", {}, has(r.lr) ? r.lr.toExponential(2) : ""),
    ["loss", "task_loss", "kd_loss", "feature_loss", "val_accuracy"].map((k) => h("td", {}, fmtNum(r[k]))),
    h("td", {}, fmtNum(r.seconds, 1)))), { className: "numbers" });
}

// A stage's chart; `update(rows)` redraws it with new rows (a running job's next epochs).
export function stageChart(stage, rows) {
  const plot = h("div", { class: "chart", dataset: { chart: stage }, role: "img" });
  const details = h("details", {}, h("summary", {}, `${stage}: the numbers`));
  const figure = h("figure", { class: "curves" }, h("figcaption", {}, stage), plot, details);
  let chart = null;
  let keys = "";
  let current = rows;

  function draw() {
    const { present, data } = chartData(current);
    const width = Math.max(plot.clientWidth || 0, 280);
    const now = present.map((s) => s.key).join();
    if (!window.uPlot) {
      plot.textContent = "The chart library did not load; the numbers are below.";
    } else if (chart && now === keys) {
      chart.setData(data);
    } else {
      chart?.destroy();
      chart = new window.uPlot(options(present, width), data, plot);
      plot.uplot = chart; // tests read the drawn data from here
      keys = now;
    }
    plot.dataset.rows = String(current.length);
    const runs = [...new Set(current.map((r) => r.run))].join(", ");
    plot.setAttribute("aria-label",
      `${stage} training curves, ${current.length} epochs (${runs}): ${present.map((s) => s.label).join(", ")}`);
    replace(details, h("summary", {}, `${stage}: the numbers`), numbers(current));
  }

  const resize = new ResizeObserver(() => {
    const width = plot.clientWidth;
    if (chart && width && Math.abs(width - chart.width) > 4) chart.setSize({ width, height: HEIGHT });
  });
  resize.observe(plot);
  queueMicrotask(draw);

  return {
    element: figure,
    update(next) { current = next; draw(); },
    destroy() { resize.disconnect(); chart?.destroy(); },
  };
}

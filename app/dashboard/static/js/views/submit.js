// Submit a job: a JSON spec editor that starts from the examples and shows the API's 422
// messages at the fields they name; dataset and teacher uploads with progress.

import { ApiError, getJSON, postJSON, upload } from "../api.js";
import { fmtBytes, h, replace } from "../dom.js";
import { keyLines, lineOf, splitErrors } from "../specerrors.js";

const DRAFT = "distillery.draft";
const LISTED = 20; // the newest uploads of each kind the page offers
// The spec's top-level fields, for telling a field's message from a "; " inside a message;
// replaced by the API's own schema (/openapi.json) once it has loaded.
let specFields = new Set(["name", "dataset", "teacher", "student", "distill", "prune", "quantize",
  "evaluate", "export", "gates", "seed", "device", "queue"]);

async function loadSpecFields() {
  try {
    const doc = await getJSON("/openapi.json");
    specFields = new Set(Object.keys(doc.components.schemas.JobSpec.properties));
  } catch { /* keep the list above */ }
}

// --- the editor ------------------------------------------------------------------------------

function editor() {
  const text = h("textarea", {
    id: "spec", name: "spec", spellcheck: "false", wrap: "off", rows: 24,
    autocapitalize: "off", "aria-describedby": "spec-help spec-errors",
  });
  const gutter = h("div", { class: "gutter", "aria-hidden": "true" });
  const marks = new Map(); // line -> message
  function paint() {
    const count = text.value.split("\n").length;
    replace(gutter, Array.from({ length: count }, (_, k) => {
      const message = marks.get(k + 1);
      return h("div", { class: message ? "bad" : null, title: message, dataset: { line: k + 1 } }, String(k + 1));
    }));
    gutter.scrollTop = text.scrollTop;
  }
  text.addEventListener("input", () => { marks.clear(); paint(); });
  text.addEventListener("scroll", () => { gutter.scrollTop = text.scrollTop; });
  // Tab indents inside the editor; Escape then Tab leaves it (keyboard users are not trapped).
  let escaped = false;
  text.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { escaped = true; return; }
    if (e.key === "Tab" && !e.shiftKey && !escaped) {
      e.preventDefault();
      text.setRangeText("  ", text.selectionStart, text.selectionEnd, "end");
      text.dispatchEvent(new Event("input"));
    }
    escaped = false;
  });
  return {
    text, element: h("div", { class: "editor" }, gutter, text),
    set(value) { text.value = value; marks.clear(); paint(); },
    mark(line, message) { marks.set(line, marks.has(line) ? `${marks.get(line)}; ${message}` : message); paint(); },
    goTo(line) {
      const lines = text.value.split("\n");
      const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
      text.focus();
      text.setSelectionRange(start, start + lines[line - 1].length);
      const lineHeight = parseFloat(getComputedStyle(text).lineHeight) || 18;
      text.scrollTop = Math.max(0, (line - 3) * lineHeight);
    },
  };
}

function parseProblem(e, value) {
  // Chrome says "… at position 123 (line 5 column 3)"; find the line from the position.
  const at = /position (\d+)/.exec(e.message);
  const line = at ? value.slice(0, Number(at[1])).split("\n").length : null;
  return { path: "", message: `Not valid JSON: ${e.message}`, line };
}

// --- uploads --------------------------------------------------------------------------------

function uploadForm({ kind, title, accept, fields, send, describe, useLabel, use }) {
  const file = h("input", { type: "file", id: `${kind}-file`, accept, required: true });
  const bar = h("progress", { id: `${kind}-progress`, max: 100, value: 0, "aria-label": `${title} upload progress`, hidden: true });
  const status = h("p", { class: "muted", role: "status", id: `${kind}-status` });
  const list = h("ul", { class: "uploads", id: `${kind}-list` });
  const button = h("button", { type: "submit" }, `Upload ${kind}`);

  // The tenant's uploads as the API lists them (newest first): one uploaded earlier, from
  // another tab or with curl, is picked here instead of uploaded again.
  async function drawList() {
    let items;
    try {
      items = (await getJSON(`${send}?limit=${LISTED}`)).data;
    } catch (e) {
      replace(list, h("li", { class: "muted" }, `Could not list the uploads: ${e.message}`));
      return;
    }
    replace(list, items.length ? items.map((item) => h("li", { dataset: { id: item.id } },
      h("code", {}, item.id), " ", item.filename, h("span", { class: "muted" }, ` · ${describe(item)}`), " ",
      h("button", { type: "button", class: "link", "aria-label": `${useLabel}: ${item.id}`, onclick: () => use(item) }, useLabel)))
      : h("li", { class: "muted" }, "None yet."));
    list.dataset.loaded = "";
  }

  async function submit(event) {
    event.preventDefault();
    if (!file.files.length) { status.textContent = "Choose a file first."; return; }
    const form = new FormData();
    form.append("file", file.files[0]);
    for (const [name, input] of Object.entries(fields)) if (input.value.trim()) form.append(name, input.value.trim());
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    status.textContent = `Uploading ${file.files[0].name} (${fmtBytes(file.files[0].size)})…`;
    try {
      const item = await upload(send, form, (f) => { bar.value = Math.round(f * 100); });
      bar.value = 100;
      status.textContent = `Uploaded: ${item.id}`;
      await drawList();
    } catch (e) {
      status.textContent = `Refused: ${e.code ? `[${e.code}] ` : ""}${e.message}`;
    } finally {
      button.disabled = false;
    }
  }

  drawList();
  return h("form", { class: "card upload", onsubmit: submit, "aria-labelledby": `${kind}-title` },
    h("h2", { id: `${kind}-title` }, title),
    h("label", { for: file.id }, `${title} file (${accept})`), file,
    Object.entries(fields).map(([name, input]) => [h("label", { for: input.id }, input.dataset.label), input]),
    button, bar, status,
    h("h3", {}, `Your ${kind}s (newest first)`), list);
}

// --- the view -------------------------------------------------------------------------------

export function submitView(root) {
  const ed = editor();
  const examples = h("select", { id: "example" }, h("option", { value: "" }, "Choose an example…"));
  const errors = h("ul", { id: "spec-errors", class: "errors", "aria-live": "assertive" });
  const submitButton = h("button", { type: "submit", class: "primary" }, "Submit job");
  let exampleList = [];
  loadSpecFields();

  ed.text.addEventListener("input", () => sessionStorage.setItem(DRAFT, ed.text.value));
  examples.addEventListener("change", () => {
    const chosen = exampleList.find((x) => x.name === examples.value);
    if (chosen) {
      ed.set(JSON.stringify(chosen.spec, null, 2));
      sessionStorage.setItem(DRAFT, ed.text.value);
      replace(errors);
    }
  });

  function showErrors(problems) {
    const lines = keyLines(ed.text.value.trim() ? ed.text.value : "{}");
    replace(errors, problems.map((p) => {
      const at = p.line ? { line: p.line, field: p.path } : lineOf(p.path, lines);
      if (at) ed.mark(at.line, p.message);
      return h("li", { dataset: { field: p.path, line: at?.line } },
        at ? h("button", { type: "button", class: "link", onclick: () => ed.goTo(at.line) }, `line ${at.line}`) : null,
        at ? " " : null,
        p.path ? h("code", {}, p.path) : null, p.path ? ": " : null, p.message);
    }));
    const first = problems.length && errors.querySelector("button");
    if (first) first.focus();
  }

  function edit(change) {
    let spec;
    try { spec = JSON.parse(ed.text.value || "{}"); } catch (e) { showErrors([parseProblem(e, ed.text.value)]); return; }
    change(spec);
    ed.set(JSON.stringify(spec, null, 2));
    sessionStorage.setItem(DRAFT, ed.text.value);
  }

  async function submit(event) {
    event.preventDefault();
    replace(errors);
    let spec;
    try { spec = JSON.parse(ed.text.value); } catch (e) { showErrors([parseProblem(e, ed.text.value)]); return; }
    submitButton.disabled = true;
    try {
      const job = await postJSON("/v1/jobs", spec, { headers: { "Idempotency-Key": `dashboard-${crypto.randomUUID?.() ?? Date.now()}` } });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      if (e instanceof ApiError && e.status === 422) showErrors(splitErrors(e.message, specFields));
      else showErrors([{ path: "", message: `${e.code ? `[${e.code}] ` : ""}${e.message}` }]);
    } finally {
      submitButton.disabled = false;
    }
  }

  const field = (id, label, attrs = {}) => h("input", { id, dataset: { label }, ...attrs });
  const modelFormat = h("select", { id: "model-format", dataset: { label: "Format" } },
    h("option", { value: "" }, "from the file name"),
    ["torchscript", "onnx", "safetensors"].map((f) => h("option", { value: f }, f)));

  replace(root,
    h("div", { class: "view-head" }, h("h1", {}, "New job")),
    h("div", { class: "submit-grid" },
      h("form", { class: "card", onsubmit: submit, "aria-labelledby": "spec-title" },
        h("h2", { id: "spec-title" }, "Spec"),
        h("label", { for: "example" }, "Start from"), examples,
        h("label", { for: "spec" }, "Job spec (JSON)"),
        h("p", { id: "spec-help", class: "muted" }, "Every field is optional; {} runs the defaults. Esc then Tab leaves the editor."),
        ed.element,
        errors,
        h("div", { class: "actions" },
          h("button", { type: "button", onclick: () => edit(() => {}) }, "Format"),
          submitButton)),
      h("div", { class: "side" },
        uploadForm({
          kind: "dataset", title: "Dataset", accept: ".npz,.zip,.tar.gz,.tgz", send: "/v1/datasets", fields: {},
          describe: (d) => `${d.num_samples} samples, ${d.num_classes} classes, input ${JSON.stringify(d.input_shape)}`,
          useLabel: "Use in spec",
          use: (d) => edit((spec) => {
            const keep = Object.fromEntries(Object.entries(spec.dataset || {}).filter(([k]) => ["test_fraction", "val_fraction", "max_samples"].includes(k)));
            spec.dataset = { source: "upload", id: d.id, ...keep };
          }),
        }),
        uploadForm({
          kind: "model", title: "Teacher model", accept: ".pt,.onnx,.safetensors", send: "/v1/models",
          fields: {
            format: modelFormat,
            arch: field("model-arch", "Arch (safetensors only)", { placeholder: "resnet18" }),
            input_shape: field("model-input-shape", "Input shape (C,H,W or D)", { placeholder: "1,8,8" }),
            num_classes: field("model-classes", "Number of classes", { type: "number", min: 1 }),
          },
          describe: (m) => `${m.format}${m.arch ? ` ${m.arch}` : ""}${m.input_shape ? `, input ${JSON.stringify(m.input_shape)}` : ""}`,
          useLabel: "Use as teacher",
          use: (m) => edit((spec) => { spec.teacher = { source: "upload", id: m.id }; }),
        }))));

  document.title = "New job · Distillery";
  getJSON("/dashboard/examples.json").then((list) => {
    exampleList = list;
    for (const x of list) examples.append(h("option", { value: x.name }, `${x.name}: ${x.description}`));
    const draft = sessionStorage.getItem(DRAFT);
    ed.set(draft ?? JSON.stringify(list[0].spec, null, 2));
  }).catch(() => ed.set(sessionStorage.getItem(DRAFT) ?? "{}"));
  ed.set(sessionStorage.getItem(DRAFT) ?? "");
}

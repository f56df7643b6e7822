// A job's artifacts, and the download button the job page uses wherever it offers a file: the
// file is fetched with the key and its sha256 checked before it is saved.

import { download } from "../api.js";
import { fmtBytes, h, table } from "../dom.js";

export function downloadButton(artifact, text = "Download") {
  const status = h("span", { class: "muted", "aria-live": "polite" });
  const button = h("button", {
    type: "button", "aria-label": `Download ${artifact.name}`, dataset: { focus: `download:${artifact.name}` },
    onclick: async () => {
      button.disabled = true;
      status.textContent = "downloading…";
      try {
        const verified = await download(artifact);
        status.textContent = verified ? "saved, sha256 verified" : "saved";
      } catch (e) {
        status.textContent = e.message;
      } finally {
        button.disabled = false;
      }
    },
  }, text);
  return [button, " ", status];
}

export function artifactsTable(artifacts) {
  if (!artifacts.length) return h("p", { class: "muted" }, "No artifacts.");
  return table(["Name", "Format", "Size", "SHA-256", ""], artifacts.map((a) => h("tr", { dataset: { artifact: a.name } },
    h("td", {}, a.name), h("td", {}, a.format), h("td", {}, fmtBytes(a.bytes)),
    h("td", {}, h("code", { class: "sha" }, a.sha256)),
    h("td", {}, downloadButton(a)))), { className: "artifacts" });
}

// Boot and routing: #/jobs, #/jobs/<id>, #/submit. Every view needs a key; without one the
// sign-in form shows, and the route asked for opens once signed in.

import { auth, whenUnauthorized } from "./api.js";
import { h, replace } from "./dom.js";
import { signIn } from "./views/signin.js";
import { jobsView } from "./views/jobs.js";
import { jobView } from "./views/job.js";
import { submitView } from "./views/submit.js";

const main = document.getElementById("main");
let cleanup = () => {};

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query);
  if (parts[0] === "jobs" && parts[1]) return { name: "job", id: decodeURIComponent(parts[1]), params };
  if (parts[0] === "submit") return { name: "submit", params };
  return { name: "jobs", params };
}

function chrome(signedIn, current) {
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").hidden = !signedIn;
  const key = auth.get();
  document.getElementById("who-key").textContent = key ? `key ${key.slice(0, 7)}…` : "";
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function render({ focus = true, notice } = {}) {
  cleanup();
  cleanup = () => {};
  const r = route();
  if (!auth.get()) {
    chrome(false);
    document.title = "Sign in · Distillery";
    replace(main, signIn({ notice, onSignedIn: () => render() }));
    return;
  }
  chrome(true, r.name === "job" ? "jobs" : r.name);
  const view = { jobs: jobsView, job: jobView, submit: submitView }[r.name];
  const container = h("div", { class: "view" });
  replace(main, container);
  cleanup = view(container, r) || (() => {});
  if (focus) main.focus({ preventScroll: true });
}

document.getElementById("sign-out").addEventListener("click", () => {
  auth.clear();
  render({ notice: "Signed out." });
});

whenUnauthorized(() => {
  auth.clear();
  render({ notice: "The service no longer accepts this API key; sign in again." });
});

window.addEventListener("hashchange", () => render());
render({ focus: false });

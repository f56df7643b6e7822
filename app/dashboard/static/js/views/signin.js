// Sign in with an API key: checked against the API before it is kept (in sessionStorage).

import { auth, request } from "../api.js";
import { h } from "../dom.js";

export function signIn({ notice, onSignedIn }) {
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off",
    spellcheck: "false", required: true, "aria-describedby": "api-key-help",
  });
  const message = h("p", { id: "sign-in-error", class: "error-text", role: "alert" });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");

  async function submit(event) {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      message.textContent = "Enter an API key.";
      input.focus();
      return;
    }
    button.disabled = true;
    message.textContent = "";
    try {
      await request("/v1/jobs?limit=1", { key });
      auth.set(key);
      onSignedIn();
    } catch (e) {
      message.textContent = e.status === 401
        ? "The service refused this API key: it is wrong or has been revoked."
        : `Could not sign in: ${e.message}`;
      input.setAttribute("aria-invalid", "true");
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  const form = h("form", { class: "card sign-in", onsubmit: submit, "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    notice ? h("p", { class: "notice", role: "status" }, notice) : null,
    h("label", { for: "api-key" }, "API key"),
    input,
    h("p", { id: "api-key-help", class: "muted" },
      "A key of your tenant (dk_…). `distillery serve` prints one and keeps it in .distillery/api_key; ",
      "`distillery keys create --tenant NAME` makes more. It stays in this tab only."),
    message,
    button);
  queueMicrotask(() => input.focus());
  return form;
}

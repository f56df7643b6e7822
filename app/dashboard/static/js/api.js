// The REST API, same origin, with the signed-in key as a Bearer token. The key lives in this
// tab's sessionStorage only: never in a URL, never in a cookie.

const KEY = "distillery.apiKey";

export const auth = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(fn) { onUnauthorized = fn; }

function headersFor(key, extra) {
  const headers = { Accept: "application/json", ...extra };
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new ApiError(response.status, body.error.code, body.error.message);
  } catch {
    return new ApiError(response.status, "http_error", `${response.status} ${response.statusText}`);
  }
}

// `key` given: try that key (signing in) without signing anyone out on a 401.
export async function request(path, { method = "GET", body, headers, signal, key } = {}) {
  const init = { method, signal, headers: headersFor(key ?? auth.get(), headers), credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.body = body instanceof FormData || typeof body === "string" ? body : JSON.stringify(body);
    if (!(body instanceof FormData)) init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "unreachable", "Cannot reach the service; is it running?");
  }
  if (!response.ok) {
    const err = await errorOf(response);
    if (response.status === 401 && key === undefined) onUnauthorized(err);
    throw err;
  }
  return response;
}

export const getJSON = async (path, opts) => (await request(path, opts)).json();
export const postJSON = async (path, body, opts = {}) =>
  (await request(path, { ...opts, method: "POST", body })).json();

function parseEvent(block) {
  const fields = {};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(": ");
    if (at > 0) fields[line.slice(0, at)] = line.slice(at + 2);
  }
  if (!fields.event) return null;
  return { id: Number(fields.id || 0), type: fields.event, data: JSON.parse(fields.data || "{}") };
}

// A job's server-sent events through fetch(): EventSource cannot send the Authorization
// header. Reconnects with Last-Event-ID until the `end` event or `signal` aborts.
export async function streamEvents(jobId, onEvent, { signal } = {}) {
  let last = 0;
  for (let failures = 0; !signal?.aborted; ) {
    try {
      const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
        headers: { Accept: "text/event-stream", "Last-Event-ID": String(last) },
        signal,
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          last = event.id || last;
          failures = 0;
          onEvent(event);
          if (event.type === "end") return;
        }
      }
    } catch (e) {
      if (e.name === "AbortError" || (e instanceof ApiError && e.status >= 400 && e.status < 500)) return;
    }
    failures += 1;
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * 2 ** failures, 15000)));
  }
}

// Uploads report their progress: fetch() cannot tell how much of a request body went out.
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${auth.get()}`);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => e.lengthComputable && onProgress(e.loaded / e.total));
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
      if (xhr.status === 401) onUnauthorized();
      const err = body?.error ?? { code: "http_error", message: `${xhr.status} ${xhr.statusText}` };
      reject(new ApiError(xhr.status, err.code, err.message));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "unreachable", "Cannot reach the service")));
    xhr.send(form);
  });
}

async function sha256Hex(blob) {
  if (!crypto.subtle) return null; // only in secure contexts (https, localhost)
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// Fetch an artifact with the key, check its sha256 where the browser can, and save it.
export async function download(artifact) {
  // The path only: the API names its own host, which a proxy in front may rename. Through the
  // API, not a redirect to the store: a bucket would need a CORS rule for the page to read it.
  const path = new URL(artifact.url, location.href).pathname;
  const response = await request(`${path}?redirect=false`, { headers: { Accept: "*/*" } });
  const blob = await response.blob();
  const digest = await sha256Hex(blob);
  if (digest !== null && digest !== artifact.sha256) {
    throw new ApiError(0, "download_failed", `${artifact.name}: sha256 does not match; try again`);
  }
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: artifact.name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return digest !== null;
}

// The API's 422 message names fields ("distill.epochs: Input should be …; prune.amount: …");
// these helpers split it per field and find the line of each field in the editor's JSON.

// Split "a.b: msg; c: msg" into [{path, message}], keeping a "; " inside one message (as in
// "unknown arch 'x'; known: …") when what follows does not start with a field of the spec.
export function splitErrors(message, roots) {
  const out = [];
  for (const part of message.split("; ")) {
    const m = /^([\w.[\]-]+): ([\s\S]*)$/.exec(part);
    const root = m ? m[1].split(".")[0] : null;
    if (m && (roots.has(root) || root === "body" || !out.length)) out.push({ path: m[1], message: m[2] });
    else if (out.length) out[out.length - 1].message += `; ${part}`;
    else out.push({ path: "", message: part });
  }
  return out;
}

// Lines of every key in a JSON text: Map("distill.epochs" -> 7). Tolerates nothing: the
// editor sends only text that JSON.parse accepted.
export function keyLines(text) {
  const lines = new Map();
  let i = 0;
  let line = 1;
  const ws = () => {
    while (i < text.length && /\s/.test(text[i])) { if (text[i] === "\n") line += 1; i += 1; }
  };
  const string = () => {
    const start = i;
    i += 1;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    i += 1;
    return JSON.parse(text.slice(start, i));
  };
  const value = (path) => {
    ws();
    if (text[i] === "{") {
      i += 1; ws();
      while (text[i] !== "}") {
        const at = line;
        const key = string();
        const child = path ? `${path}.${key}` : key;
        lines.set(child, at);
        ws(); i += 1; // ':'
        value(child); ws();
        if (text[i] === ",") { i += 1; ws(); }
      }
      i += 1;
    } else if (text[i] === "[") {
      i += 1; ws();
      for (let k = 0; text[i] !== "]"; k++) {
        const child = `${path}.${k}`;
        ws();
        lines.set(child, line);
        value(child); ws();
        if (text[i] === ",") { i += 1; ws(); }
      }
      i += 1;
    } else if (text[i] === '"') {
      string();
    } else {
      while (i < text.length && /[^,\]}\s]/.test(text[i])) i += 1;
    }
  };
  value("");
  return lines;
}

// The line a field path points at: the deepest part of it that is in the text (a union's tag
// such as "train" in "teacher.train.epochs" is skipped; a missing field points at its parent).
export function lineOf(path, lines) {
  let found = null;
  let at = "";
  for (const part of path.split(".")) {
    const next = at ? `${at}.${part}` : part;
    if (lines.has(next)) {
      at = next;
      found = { line: lines.get(next), field: next };
    }
  }
  return found;
}

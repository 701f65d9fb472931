// The relay's chat page: plain JS, no framework, no build step.
//
// Two ways to get an answer (docs/api.md):
// - one-shot: fetch POST /aianswer/streamAsk and read the event stream from
//   response.body with the small SSE reader below; each question carries an
//   Idempotency-Key of its own, so the relay keeps its answer under that key
//   and Stop DELETEs it (the X-Relay-Session of the response);
// - resumable: POST /aianswer/sessions, then a native EventSource on the stream
//   URL, which reconnects by itself and resumes with Last-Event-ID.
// Model output is only ever inserted as text, never as HTML.

/** How long to wait for the first event before giving up (tests may lower it). */
export const FIRST_EVENT_TIMEOUT_MS = Number(globalThis.RELAY_FIRST_EVENT_MS) || 30_000;
const MAX_LINE = 1 << 20; // characters; the server's bound on a data line

const KEYS = { robot: "relay.robotId", token: "relay.token", resumable: "relay.resumable" };

// ---------------------------------------------------------------------------
// Event-stream parsing: the same line rules as relay/sse.py (WHATWG HTML 9.2.5).

/** Incremental parser: feed() decoded text, get complete events back. */
export class SSEParser {
  constructor() {
    this.pending = ""; // the unterminated line
    this.started = false;
    this.skipLF = false; // the last chunk ended in CR: an LF next completes a CRLF
    this.data = [];
    this.type = "";
    this.idBuffer = "";
    this.lastEventId = "";
    this.retry = null;
  }

  feed(text) {
    const events = [];
    if (!text) return events;
    if (!this.started) {
      this.started = true;
      if (text[0] === "\uFEFF") text = text.slice(1);
    }
    if (this.skipLF) {
      this.skipLF = false;
      if (text[0] === "\n") text = text.slice(1);
    }
    if (text.includes("\r")) {
      // Lines end with CRLF, LF or CR; a trailing CR ends its line now.
      this.skipLF = text.endsWith("\r");
      text = text.replace(/\r\n?/g, "\n");
    }
    const lines = (this.pending + text).split("\n");
    this.pending = lines.pop();
    if (this.pending.length > MAX_LINE) throw new Error("event-stream line too long");
    for (const line of lines) {
      if (line === "") {
        const event = this.dispatch();
        if (event) events.push(event);
      } else if (line[0] !== ":") {
        // A line starting with a colon is a comment (heartbeats): ignored.
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value[0] === " ") value = value.slice(1);
        this.field(field, value);
      }
    }
    return events;
  }

  field(name, value) {
    if (name === "data") this.data.push(value);
    else if (name === "event") this.type = value;
    else if (name === "id") {
      if (!value.includes("\0")) this.idBuffer = value;
    } else if (name === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
  }

  dispatch() {
    this.lastEventId = this.idBuffer;
    if (this.data.length === 0) {
      this.type = "";
      return null;
    }
    const event = { type: this.type || "message", data: this.data.join("\n"), id: this.lastEventId };
    this.data = [];
    this.type = "";
    return event;
  }
}

/** Events from a fetch response body, as they arrive. An unfinished last event is dropped. */
export async function* readEventStream(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8"); // stream mode keeps a split character for later
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        yield* parser.feed(decoder.decode());
        return;
      }
      yield* parser.feed(decoder.decode(value, { stream: true }));
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---------------------------------------------------------------------------
// Small helpers.

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const store = {
  get(key, fallback = "") {
    try {
      return localStorage.getItem(key) ?? fallback;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(key, value);
    } catch {
      /* private mode: not remembered */
    }
  },
};

class TurnError extends Error {
  constructor(message, code = "error") {
    super(message);
    this.code = code;
  }
}

function authHeaders() {
  const token = ui.token.value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** The TurnError for a non-2xx response: the JSON error.message, and a word on 401. */
async function httpError(res) {
  let code = `http_${res.status}`;
  let message = res.statusText || "request failed";
  try {
    const doc = await res.json();
    if (doc && doc.error) {
      code = doc.error.code || code;
      message = doc.error.message || message;
    }
  } catch {
    /* not JSON: keep the status text */
  }
  if (res.status === 401) {
    showTokenField();
    return new TurnError(
      "Unauthorized: token missing or wrong. Enter the access token (Token, at the top) and retry.",
      "unauthorized",
    );
  }
  const after = res.headers.get("Retry-After");
  const hint = after ? ` Retry after ${after} s.` : "";
  return new TurnError(`${message} (HTTP ${res.status}).${hint}`, code);
}

function streamError(data) {
  let code = "error";
  let message = "the server reported an error";
  try {
    const doc = JSON.parse(data);
    code = doc.error?.code || code;
    message = doc.error?.message || message;
  } catch {
    if (data) message = data;
  }
  return new TurnError(`${message} (${code})`, code);
}

function secs(ms) {
  return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Not a secure context, or no permission: the old way.
    const area = el("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

// ---------------------------------------------------------------------------
// One question and its answer bubble.

class Turn {
  constructor(question) {
    this.question = question;
    this.root = el("article", "turn");
    const q = el("div", "bubble question", question);
    this.bubble = el("div", "bubble answer");
    this.reasoning = el("details", "reasoning");
    this.reasoning.append(el("summary", "", "Reasoning"));
    this.reasoningText = el("div", "reasoning-text");
    this.reasoning.append(this.reasoningText);
    this.reasoning.hidden = true;
    this.textEl = el("div", "text");
    this.body = el("span", "body");
    this.bodyText = document.createTextNode("");
    this.body.append(this.bodyText);
    this.cursor = el("span", "cursor");
    this.cursor.setAttribute("aria-hidden", "true");
    this.textEl.append(this.body, this.cursor);
    this.note = el("div", "note");
    this.note.hidden = true;
    this.errorEl = el("div", "error");
    this.errorEl.setAttribute("role", "alert");
    this.errorEl.hidden = true;
    this.errorText = el("span", "error-text");
    this.retryButton = el("button", "retry", "Retry");
    this.retryButton.type = "button";
    this.retryButton.addEventListener("click", () => retry(this));
    this.errorEl.append(this.errorText, this.retryButton);
    this.meta = el("div", "meta");
    this.stats = el("span", "stats");
    this.copyButton = el("button", "copy ghost", "Copy");
    this.copyButton.type = "button";
    this.copyButton.addEventListener("click", async () => {
      const ok = await copyText(this.answer);
      this.copyButton.textContent = ok ? "Copied" : "Copy failed";
      setTimeout(() => (this.copyButton.textContent = "Copy"), 1500);
    });
    this.meta.append(this.stats, this.copyButton);
    this.bubble.append(this.reasoning, this.textEl, this.note, this.errorEl, this.meta);
    this.root.append(q, this.bubble);
    this.reset();
  }

  reset() {
    this.answer = "";
    this.bodyText.data = "";
    this.reasoningText.textContent = "";
    this.reasoning.hidden = true;
    this.tokens = 0;
    this.usageTokens = 0;
    this.started = performance.now();
    this.firstAt = 0;
    this.lastAt = 0;
    this.occurTime = "";
    this.setNote("");
    this.errorEl.hidden = true;
    this.meta.hidden = true;
    this.textEl.hidden = false;
    this.setState("waiting");
  }

  setState(state) {
    this.state = state;
    this.root.dataset.state = state;
    this.bubble.setAttribute("aria-busy", String(state === "waiting" || state === "streaming"));
  }

  setNote(text) {
    this.note.textContent = text;
    this.note.hidden = !text;
  }

  tick() {
    const now = performance.now();
    if (!this.firstAt) this.firstAt = now;
    this.lastAt = now;
    this.tokens += 1;
    if (this.state === "waiting") this.setState("streaming");
  }

  addText(text) {
    this.tick();
    this.answer += text;
    this.bodyText.appendData(text);
    follow();
  }

  addReasoning(text) {
    this.tick();
    this.reasoning.hidden = false;
    this.reasoningText.append(document.createTextNode(text));
    follow();
  }

  end(state, error) {
    this.setState(state);
    this.setNote("");
    this.textEl.hidden = !this.answer;
    if (error) {
      this.errorText.textContent = error.message;
      this.errorEl.hidden = false;
    }
    const parts = [];
    if (this.firstAt) {
      parts.push(`first token ${secs(this.firstAt - this.started)}`);
      const count = this.usageTokens || this.tokens;
      const span = (this.lastAt - this.firstAt) / 1000;
      if (count > 1 && span > 0) parts.push(`${((count - 1) / span).toFixed(1)} tokens/s`);
    }
    if (this.occurTime) parts.push(this.occurTime);
    if (state === "stopped") parts.push("stopped");
    this.stats.textContent = parts.join(" · ");
    this.copyButton.hidden = !this.answer;
    this.meta.hidden = parts.length === 0 && !this.answer;
  }
}

/** Apply one event to the turn. Returns "done" on [DONE]; throws TurnError on an error. */
function applyEvent(turn, event) {
  if (event.type === "error") throw streamError(event.data);
  if (event.type !== "message") return null;
  if (event.data === "[DONE]") return "done";
  let chunk;
  try {
    chunk = JSON.parse(event.data);
  } catch {
    throw new TurnError("The relay sent a chunk that is not JSON.", "bad_chunk");
  }
  if (chunk.error) throw streamError(JSON.stringify(chunk));
  const choice = chunk.choices?.[0];
  if (choice) {
    const delta = choice.delta || {};
    if (typeof delta.reasoning_content === "string" && delta.reasoning_content) {
      turn.addReasoning(delta.reasoning_content);
    }
    if (typeof delta.content === "string" && delta.content) turn.addText(delta.content);
    if (choice.finish_reason && delta.occurTime) turn.occurTime = delta.occurTime;
  }
  if (chunk.usage?.completion_tokens) turn.usageTokens = chunk.usage.completion_tokens;
  return null;
}

// ---------------------------------------------------------------------------
// The two transports. Each resolves "done" or "stopped", or throws TurnError.

const FIRST_EVENT_MESSAGE = () =>
  `No answer within ${FIRST_EVENT_TIMEOUT_MS / 1000} s: the model did not start ` +
  "answering, so the request was abandoned.";

/** A fresh Idempotency-Key (16 to 128 visible ASCII characters). */
function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Not a secure context (plain http to another host): 128 random bits in hex.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function askOnce(text, key, signal, more = {}) {
  return fetch("/aianswer/streamAsk", {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "text/event-stream",
      "Idempotency-Key": key,
      ...authHeaders(),
      ...more,
    },
    body: text,
    signal,
  });
}

/**
 * Cancel a keyed answer the page gave up on, so that it does not run on for the
 * relay's resume grace. Its session is named by the response's X-Relay-Session;
 * before the response came, a repeat of the request (same key, same body) with
 * Last-Event-ID: 0 is answered at once, headers first, and names it.
 */
async function cancelAnswer(uid, text, key) {
  if (!uid) {
    const ctrl = new AbortController();
    try {
      const res = await askOnce(text, key, ctrl.signal, { "Last-Event-ID": "0" });
      uid = res.headers.get("X-Relay-Session");
    } catch {
      return;
    } finally {
      ctrl.abort();
    }
  }
  if (uid) deleteSession(uid);
}

async function runOneShot(turn, body, job) {
  const ctrl = new AbortController();
  const text = JSON.stringify(body);
  const key = newKey(); // per run: a Retry is a new answer
  let uid = null;
  let why = null;
  const giveUp = (reason) => {
    why = reason;
    ctrl.abort();
    cancelAnswer(uid, text, key);
  };
  job.stop = () => giveUp("stopped");
  const timer = setTimeout(() => giveUp("timeout"), FIRST_EVENT_TIMEOUT_MS);
  try {
    const res = await askOnce(text, key, ctrl.signal);
    uid = res.headers.get("X-Relay-Session");
    if (!res.ok) throw await httpError(res);
    const type = res.headers.get("Content-Type") || "";
    if (!type.toLowerCase().startsWith("text/event-stream")) {
      throw new TurnError(`Unexpected response: ${type || "no content type"}, not an event stream.`);
    }
    for await (const event of readEventStream(res.body)) {
      clearTimeout(timer);
      if (applyEvent(turn, event) === "done") return "done";
    }
    throw new TurnError("The stream ended unexpectedly (no [DONE]).", "ended");
  } catch (e) {
    if (why === "stopped") return "stopped";
    if (why === "timeout") throw new TurnError(FIRST_EVENT_MESSAGE(), "timeout");
    if (e instanceof TurnError) throw e;
    throw new TurnError(
      turn.answer
        ? "The connection was lost in the middle of the answer."
        : "Could not reach the relay (network error).",
      "network",
    );
  } finally {
    clearTimeout(timer);
  }
}

function deleteSession(uid) {
  fetch(`/aianswer/sessions/${encodeURIComponent(uid)}`, {
    method: "DELETE",
    headers: authHeaders(),
  }).catch(() => {});
}

async function runSession(turn, body, job) {
  const ctrl = new AbortController();
  let why = null;
  let onTimeout = () => {
    why = "timeout";
    ctrl.abort();
  };
  const timer = setTimeout(() => onTimeout(), FIRST_EVENT_TIMEOUT_MS);
  job.stop = () => {
    why = "stopped";
    ctrl.abort();
  };
  let created;
  try {
    const res = await fetch("/aianswer/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: ctrl.signal,
    });
    if (!res.ok) throw await httpError(res);
    created = await res.json();
  } catch (e) {
    clearTimeout(timer);
    if (why === "stopped") return "stopped";
    if (why === "timeout") throw new TurnError(FIRST_EVENT_MESSAGE(), "timeout");
    if (e instanceof TurnError) throw e;
    throw new TurnError("Could not reach the relay (network error).", "network");
  }
  const { uid, streamUrl } = created;
  return new Promise((resolve, reject) => {
    const source = new EventSource(new URL(streamUrl, location.href));
    let lastId = 0;
    let settled = false;
    const settle = (fn, value) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      source.close();
      fn(value);
    };
    job.stop = () => {
      settle(resolve, "stopped");
      deleteSession(uid);
    };
    onTimeout = () => {
      settle(reject, new TurnError(FIRST_EVENT_MESSAGE(), "timeout"));
      deleteSession(uid);
    };
    source.onmessage = (event) => {
      clearTimeout(timer);
      turn.setNote("");
      // Every event has a sequence id; the server resumes after Last-Event-ID, and
      // this guard keeps a replayed event from ever being shown twice.
      const id = Number(event.lastEventId);
      if (id) {
        if (id <= lastId) return;
        lastId = id;
      }
      try {
        if (applyEvent(turn, { type: "message", data: event.data }) === "done") {
          settle(resolve, "done");
        }
      } catch (e) {
        settle(reject, e);
      }
    };
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent) {
        // The server's own `event: error` frame (it has data), not a lost connection.
        settle(reject, streamError(event.data));
      } else if (source.readyState === EventSource.CLOSED) {
        // 204 (nothing left), 404, or a response that is not an event stream.
        settle(reject, new TurnError("The stream ended unexpectedly (no [DONE]).", "ended"));
      } else {
        turn.setNote("Connection lost; reconnecting…");
      }
    });
  });
}

// ---------------------------------------------------------------------------
// The page.

const ui = {};
const turns = [];
let current = null; // the running job: { turn, stop() }

function follow() {
  const main = ui.transcript;
  if (main.scrollHeight - main.scrollTop - main.clientHeight < 120) {
    main.scrollTop = main.scrollHeight;
  }
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  for (const turn of turns) turn.retryButton.disabled = busy;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function showTokenField() {
  ui.auth.open = true;
  ui.auth.classList.add("needed");
  if (document.activeElement !== ui.question) ui.token.focus();
}

function historyBefore(turn) {
  const pairs = [];
  for (const t of turns) {
    if (t === turn) break;
    if (t.answer) pairs.push([t.question, t.answer]);
  }
  return pairs;
}

async function run(turn) {
  if (current) return;
  turn.reset();
  const job = { turn, stop: () => {} };
  current = job;
  setBusy(true);
  const body = {
    robotId: ui.robot.value || "1",
    aiQuestion: turn.question,
    aiQuestionHistory: historyBefore(turn),
  };
  const transport = ui.resumable.checked ? runSession : runOneShot;
  try {
    const outcome = await transport(turn, body, job);
    turn.end(outcome);
  } catch (e) {
    const error = e instanceof TurnError ? e : new TurnError(String(e?.message || e));
    turn.end("error", error);
  } finally {
    current = null;
    setBusy(false);
    follow();
  }
}

function retry(turn) {
  if (!current) run(turn);
}

function ask() {
  const question = ui.question.value;
  if (!question.trim() || current) return;
  ui.question.value = "";
  ui.empty.hidden = true;
  const turn = new Turn(question);
  turns.push(turn);
  ui.turns.append(turn.root);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  run(turn);
}

function stop() {
  if (current) current.stop();
}

function newChat() {
  stop();
  turns.length = 0;
  for (const node of ui.turns.querySelectorAll(".turn")) node.remove();
  ui.empty.hidden = false;
  ui.question.focus();
}

async function loadRobots() {
  let robots;
  try {
    const res = await fetch("/aianswer/robots", { headers: authHeaders() });
    if (res.status === 401) {
      showTokenField();
      showNotice("Unauthorized: token missing or wrong. Enter the access token.");
      return;
    }
    if (!res.ok) throw await httpError(res);
    robots = (await res.json()).robots || [];
  } catch (e) {
    showNotice(`Could not load the robots: ${e.message}`);
    return;
  }
  showNotice("");
  ui.auth.classList.remove("needed");
  const wanted = store.get(KEYS.robot) || ui.robot.value;
  ui.robot.replaceChildren();
  for (const robot of robots) {
    const option = el("option", "", robot.robotName || `Robot ${robot.robotId}`);
    option.value = String(robot.robotId);
    ui.robot.append(option);
  }
  if (robots.some((r) => String(r.robotId) === wanted)) ui.robot.value = wanted;
  ui.robot.disabled = robots.length === 0;
}

function init() {
  for (const id of ["robot", "resumable", "auth", "token", "notice", "transcript", "turns"]) {
    ui[id] = $(id);
  }
  Object.assign(ui, {
    empty: $("empty"),
    form: $("composer"),
    question: $("question"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
  });

  ui.token.value = store.get(KEYS.token);
  if (ui.token.value) ui.auth.classList.add("set");
  ui.resumable.checked = store.get(KEYS.resumable) === "1";

  ui.robot.addEventListener("change", () => store.set(KEYS.robot, ui.robot.value));
  ui.resumable.addEventListener("change", () =>
    store.set(KEYS.resumable, ui.resumable.checked ? "1" : "0"),
  );
  ui.token.addEventListener("input", () => {
    store.set(KEYS.token, ui.token.value.trim());
    ui.auth.classList.toggle("set", Boolean(ui.token.value.trim()));
  });
  ui.token.addEventListener("change", loadRobots);

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    ask();
  });
  ui.question.addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition
    // (Chinese, Japanese input) only confirms the characters.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      ask();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && current) stop();
  });

  loadRobots();
  ui.question.focus();
  document.documentElement.dataset.ready = "1";
}

init();

// The relay's chat page: plain JS, no framework, no build step.
//
// Two ways to get an answer (docs/api.md):
// - one-shot: fetch POST /aianswer/streamAsk and read the event stream from
//   response.body with the small SSE reader below; each question carries an
//   Idempotency-Key of its own, so the relay keeps its answer under that key,
//   Stop DELETEs it (the X-Relay-Session of the response), and after a reload the
//   same request with the same key and a Last-Event-ID reads on where it stopped;
// - resumable: POST /aianswer/sessions, then a native EventSource on the stream
//   URL, which reconnects by itself and resumes with Last-Event-ID (after a
//   reload, ?lastEventId= on the URL: EventSource cannot set the header).
// Answers are Markdown, rendered by static/markdown.js (sanitised) at most once per
// animation frame. The conversation, and the answer being streamed with what is
// needed to resume it, are kept in localStorage, so a reload loses neither.

import { MarkdownView } from "./markdown.js";

/** How long to wait for the first event before giving up (tests may lower it). */
export const FIRST_EVENT_TIMEOUT_MS = Number(globalThis.RELAY_FIRST_EVENT_MS) || 30_000;
const MAX_LINE = 1 << 20; // characters; the server's bound on a data line
// The server's bounds on a question's history (relay/ask.py).
const MAX_PAIRS = 200;
const MAX_BODY = 1 << 20; // bytes

const KEYS = {
  robot: "relay.robotId",
  token: "relay.token",
  resumable: "relay.resumable",
  chat: "relay.chat", // the conversation: finished turns, and the running one as it began
  live: "relay.live", // the running answer: its text so far, last event id, how to resume
  request: "relay.request", // and its request body (up to 1 MiB: written once, not per frame)
};
// What the page keeps of a conversation: the turns the server can take as history and the
// question after them, in at most 2 M characters (localStorage holds about 5 M per site).
const KEPT_TURNS = MAX_PAIRS + 1;
const KEPT_CHARS = 2 << 20;

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

function button(className, text, onClick) {
  const node = el("button", className, text);
  node.type = "button";
  node.addEventListener("click", onClick);
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
      return true;
    } catch {
      return false; // private mode, or full: not remembered
    }
  },
  remove(key) {
    try {
      localStorage.removeItem(key);
    } catch {
      /* nothing kept */
    }
  },
  getJSON(key) {
    try {
      return JSON.parse(store.get(key, "null"));
    } catch {
      return null;
    }
  },
};

const encoder = new TextEncoder();
const utf8Length = (text) => encoder.encode(text).length;

/** The longest tail of `items` whose sizes add up to at most `budget`. */
function tailWithin(items, sizeOf, budget) {
  let start = items.length;
  while (start > 0) {
    budget -= sizeOf(items[start - 1]);
    if (budget < 0) break;
    start -= 1;
  }
  return items.slice(start);
}

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

async function copyWithFeedback(target, text) {
  const ok = await copyText(text);
  target.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => (target.textContent = "Copy"), 1500);
}

// ---------------------------------------------------------------------------
// Rendering: answers are drawn at most once per animation frame, however fast tokens come;
// the running answer is saved for a reload in the same frame.

const drawn = new Set(); // turns with text not drawn yet
let frame = 0;

function scheduleDraw(turn) {
  drawn.add(turn);
  if (!frame) frame = requestAnimationFrame(drawFrame);
}

function drawFrame() {
  frame = 0;
  for (const turn of drawn) turn.draw();
  drawn.clear();
  saveLive();
  follow();
}

// Elements the streaming cursor may go into: it follows the last word, not the last block.
const CURSOR_HOSTS = new Set("P UL OL LI BLOCKQUOTE H1 H2 H3 H4 H5 H6".split(" "));

function cursorHost(node) {
  for (;;) {
    let last = node.lastChild;
    while (last?.nodeType === Node.TEXT_NODE && !last.data.trim()) last = last.previousSibling;
    if (last?.nodeType !== Node.ELEMENT_NODE || !CURSOR_HOSTS.has(last.tagName)) return node;
    node = last;
  }
}

const FINISH_NOTES = {
  length: "The answer was cut short: the model reached its length limit (finish_reason length).",
  content_filter:
    "The answer was cut short by the provider's content filter (finish_reason content_filter).",
};

// ---------------------------------------------------------------------------
// One question and its answer bubble.

class Turn {
  constructor(question) {
    this.question = question;
    this.live = null; // while it runs: how to reach its answer again (transport, key, uid)
    this.root = el("article", "turn");
    const q = el("div", "bubble question", question);
    this.bubble = el("div", "bubble answer");
    this.reasoning = el("details", "reasoning");
    this.reasoning.append(el("summary", "", "Reasoning"));
    this.reasoningText = el("div", "reasoning-text");
    this.reasoning.append(this.reasoningText);
    this.textEl = el("div", "text");
    this.body = el("div", "body markdown");
    this.view = new MarkdownView(this.body);
    this.cursor = el("span", "cursor");
    this.cursor.setAttribute("aria-hidden", "true");
    this.textEl.append(this.body);
    this.note = el("div", "note");
    this.finishNote = el("div", "finish-note");
    this.errorEl = el("div", "error");
    this.errorEl.setAttribute("role", "alert");
    this.errorText = el("span", "error-text");
    this.retryButton = button("retry", "Retry", () => retry(this));
    this.errorEl.append(this.errorText, this.retryButton);
    this.meta = el("div", "meta");
    this.stats = el("span", "stats");
    this.copyButton = button("copy ghost", "Copy", () =>
      copyWithFeedback(this.copyButton, this.answer),
    );
    this.regenerateButton = button("regenerate ghost", "Regenerate", () => retry(this));
    this.meta.append(this.stats, this.copyButton, this.regenerateButton);
    this.bubble.append(
      this.reasoning,
      this.textEl,
      this.finishNote,
      this.note,
      this.errorEl,
      this.meta,
    );
    this.root.append(q, this.bubble);
    this.reset();
  }

  /** A turn with the text localStorage kept (`record()`); its caller sets its state. */
  static from(record) {
    const turn = new Turn(record.q);
    turn.answer = record.a;
    turn.setReasoning(String(record.r || ""));
    turn.finish = String(record.finish || "");
    turn.draw();
    return turn;
  }

  /** What localStorage keeps of the turn (the running one is kept as it began). */
  record() {
    return {
      q: this.question,
      a: this.answer,
      r: this.reasoningSource,
      state: this.state,
      finish: this.finish,
      stats: this.stats.textContent,
      error: this.errorEl.hidden ? "" : this.errorText.textContent,
    };
  }

  reset() {
    this.answer = "";
    this.setReasoning("");
    this.lastId = 0; // the last event applied: where a resume reads on from
    this.finish = "";
    this.tokens = 0;
    this.usageTokens = 0;
    this.started = performance.now();
    this.firstAt = 0;
    this.lastAt = 0;
    this.occurTime = "";
    this.draw();
    this.setNote("");
    this.finishNote.hidden = true;
    this.errorEl.hidden = true;
    this.meta.hidden = true;
    this.textEl.hidden = false;
    this.setState("waiting");
  }

  setState(state) {
    this.state = state;
    this.root.dataset.state = state;
    // Screen readers wait for the whole answer instead of reading every frame's change.
    this.bubble.setAttribute("aria-busy", String(state === "waiting" || state === "streaming"));
  }

  setNote(text) {
    this.note.textContent = text;
    this.note.hidden = !text;
  }

  setReasoning(text) {
    this.reasoningSource = text;
    this.reasoningText.textContent = text;
    this.reasoning.hidden = !text;
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
    scheduleDraw(this);
  }

  addReasoning(text) {
    this.tick();
    this.reasoningSource += text;
    this.reasoning.hidden = false;
    this.reasoningText.append(document.createTextNode(text));
    scheduleDraw(this);
  }

  /** Render the answer's Markdown, with the cursor after its last word. */
  draw() {
    drawn.delete(this);
    this.view.render(this.answer);
    cursorHost(this.body).append(this.cursor);
  }

  end(state, error) {
    if (drawn.has(this)) this.draw();
    const parts = [];
    if (this.firstAt) {
      parts.push(`first token ${secs(this.firstAt - this.started)}`);
      const count = this.usageTokens || this.tokens;
      const span = (this.lastAt - this.firstAt) / 1000;
      if (count > 1 && span > 0) parts.push(`${((count - 1) / span).toFixed(1)} tokens/s`);
    }
    if (this.occurTime) parts.push(this.occurTime);
    if (state === "stopped") parts.push("stopped");
    this.show(state, error?.message, parts.join(" · "));
  }

  show(state, error, stats) {
    this.setState(state);
    this.setNote("");
    this.textEl.hidden = !this.answer;
    this.finishNote.textContent = FINISH_NOTES[this.finish] || "";
    this.finishNote.hidden = !this.finishNote.textContent;
    this.errorText.textContent = error || "";
    this.errorEl.hidden = !error;
    this.stats.textContent = stats;
    this.copyButton.hidden = !this.answer;
    this.meta.hidden = !stats && !this.answer;
  }
}

/** Apply one event to the turn. Returns "done" on [DONE]; throws TurnError on an error. */
function applyEvent(turn, event) {
  if (event.type === "error") throw streamError(event.data);
  if (event.type !== "message") return null;
  turn.lastId = Number(event.id) || turn.lastId;
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
    if (choice.finish_reason) {
      // The business node: the answer is complete, or was cut (length, content_filter).
      turn.finish = choice.finish_reason;
      if (delta.occurTime) turn.occurTime = delta.occurTime;
    }
  }
  if (chunk.usage?.completion_tokens) turn.usageTokens = chunk.usage.completion_tokens;
  return null;
}

// ---------------------------------------------------------------------------
// The two transports. Each resolves "done" or "stopped", or throws TurnError. Both start
// from the turn's lastId: 0 for a new question, the last event shown after a reload.

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

async function runOneShot(turn, live, job) {
  const ctrl = new AbortController();
  let why = null;
  const giveUp = (reason) => {
    why = reason;
    ctrl.abort();
    cancelAnswer(live.uid, live.body, live.key);
  };
  job.stop = () => giveUp("stopped");
  const timer = setTimeout(() => giveUp("timeout"), FIRST_EVENT_TIMEOUT_MS);
  // After a reload: the same body and key again, and the relay reads on after the last
  // event shown, from the answer it kept (no new upstream call).
  const resume = turn.lastId ? { "Last-Event-ID": String(turn.lastId) } : {};
  try {
    const res = await askOnce(live.body, live.key, ctrl.signal, resume);
    live.uid = res.headers.get("X-Relay-Session");
    if (!res.ok) throw await httpError(res);
    const type = res.headers.get("Content-Type") || "";
    if (!type.toLowerCase().startsWith("text/event-stream")) {
      throw new TurnError(`Unexpected response: ${type || "no content type"}, not an event stream.`);
    }
    for await (const event of readEventStream(res.body)) {
      clearTimeout(timer);
      const id = event.type === "message" && Number(event.id);
      // Numbered from 1 again: the relay no longer knew the key (its session TTL had
      // passed), so this is a new answer, which replaces the old one.
      if (id && id <= turn.lastId) turn.reset();
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

async function runSession(turn, live, job) {
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
  if (!live.uid) {
    try {
      const res = await fetch("/aianswer/sessions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: live.body,
        signal: ctrl.signal,
      });
      if (!res.ok) throw await httpError(res);
      const { uid, streamUrl } = await res.json();
      Object.assign(live, { uid, streamUrl });
      saveLive();
    } catch (e) {
      clearTimeout(timer);
      if (why === "stopped") return "stopped";
      if (why === "timeout") throw new TurnError(FIRST_EVENT_MESSAGE(), "timeout");
      if (e instanceof TurnError) throw e;
      throw new TurnError("Could not reach the relay (network error).", "network");
    }
  }
  const url = new URL(live.streamUrl, location.href);
  // After a reload: read on after the last event shown.
  if (turn.lastId) url.searchParams.set("lastEventId", String(turn.lastId));
  return new Promise((resolve, reject) => {
    const source = new EventSource(url);
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
      deleteSession(live.uid);
    };
    onTimeout = () => {
      settle(reject, new TurnError(FIRST_EVENT_MESSAGE(), "timeout"));
      deleteSession(live.uid);
    };
    source.onmessage = (event) => {
      clearTimeout(timer);
      turn.setNote("");
      // Every event has a sequence id; the server resumes after Last-Event-ID, and
      // this guard keeps a replayed event from ever being shown twice.
      const id = Number(event.lastEventId);
      if (id && id <= turn.lastId) return;
      try {
        const outcome = applyEvent(turn, { type: "message", data: event.data, id });
        if (outcome === "done") settle(resolve, "done");
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
// The conversation in localStorage.

/** Keep the newest turns that fit in KEPT_TURNS and KEPT_CHARS. */
function saveChat() {
  const records = turns.slice(-KEPT_TURNS).map((t) => t.record());
  let kept = tailWithin(records, (r) => JSON.stringify(r).length + 1, KEPT_CHARS);
  // Over the browser's quota (other data of the site): keep fewer.
  while (!store.set(KEYS.chat, JSON.stringify(kept)) && kept.length) {
    kept = kept.slice(Math.ceil(kept.length / 2));
  }
}

/** Save the running answer: its text and last event id together, so that they agree. */
function saveLive() {
  const turn = current?.turn;
  if (!turn?.live) return;
  const { body, ...how } = turn.live; // the body is kept apart, once (run)
  store.set(
    KEYS.live,
    JSON.stringify({
      q: turn.question,
      a: turn.answer,
      r: turn.reasoningSource,
      id: turn.lastId,
      finish: turn.finish,
      ...how,
    }),
  );
}

function forgetLive() {
  store.remove(KEYS.live);
  store.remove(KEYS.request);
}

const isRecord = (r) =>
  r && typeof r.q === "string" && typeof r.a === "string" && typeof r.state === "string";

/** Whether a kept running answer can be reached again: one-shot by its body and key (the
 * relay keeps it under the key), resumable by its session (no uid: the POST may have made
 * one or not, and a second one would be a second answer). */
function canResume(live) {
  if (live.mode === "oneshot") {
    return typeof live.body === "string" && typeof live.key === "string";
  }
  return live.mode === "resumable" && typeof live.uid === "string";
}

/** The kept conversation, shown again; the answer that was streaming reads on. */
function restore() {
  const records = store.getJSON(KEYS.chat);
  if (!Array.isArray(records)) return;
  const live = { ...store.getJSON(KEYS.live), body: store.get(KEYS.request, null) };
  let resumed = null;
  for (const record of records.filter(isRecord)) {
    const running = record.state === "waiting" || record.state === "streaming";
    let turn;
    if (running && !resumed && live.q === record.q && canResume(live)) {
      turn = resumed = Turn.from({ ...record, a: String(live.a), r: live.r, finish: live.finish });
      turn.lastId = Number(live.id) || 0;
      const { mode, body, key, uid, streamUrl } = live;
      turn.live = { mode, body, key, uid, streamUrl };
      turn.setState(turn.answer ? "streaming" : "waiting");
    } else {
      turn = Turn.from(record);
      if (running) record.error = "The page was closed before this answer was complete.";
      turn.show(running ? "error" : record.state, record.error, record.stats);
    }
    turns.push(turn);
    ui.turns.append(turn.root);
  }
  ui.empty.hidden = turns.length > 0;
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  if (resumed) run(resumed, true);
}

// ---------------------------------------------------------------------------
// The page.

const ui = {};
const turns = [];
let current = null; // the running job: { turn, stop() }
let leaving = false; // the page is being unloaded (a reload, say)

/** The conversation as the page keeps and sends it (the tests read it too). */
export function conversation() {
  return turns.map((t) => t.record());
}

function follow() {
  const main = ui.transcript;
  if (main.scrollHeight - main.scrollTop - main.clientHeight < 120) {
    main.scrollTop = main.scrollHeight;
  }
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  const last = turns.at(-1);
  for (const turn of turns) {
    turn.retryButton.disabled = busy;
    turn.regenerateButton.hidden =
      busy || turn !== last || !["done", "stopped"].includes(turn.state);
  }
}

// A notice shown or cleared moves the transcript below it by its height, so never during a
// press: it would end on something else and its click be lost (Retry pressed right after
// typing the token, whose change reloads the robots, which clears the notice).
let pressing = false;
let pendingNotice = null; // the notice to show once the press is over ("" clears it)

function showNotice(text) {
  if (pressing) {
    pendingNotice = text;
    return;
  }
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function pressEnded() {
  if (!pressing) return;
  pressing = false;
  // After the click this press makes, which comes after pointerup in the same task.
  setTimeout(() => {
    if (pressing || pendingNotice === null) return;
    const text = pendingNotice;
    pendingNotice = null;
    showNotice(text);
  });
}

function showTokenField() {
  ui.auth.open = true;
  ui.auth.classList.add("needed");
  if (document.activeElement !== ui.question) ui.token.focus();
}

/** The request for a turn: its question, and the turns before it as history, trimmed to
 * the server's limits (the newest MAX_PAIRS pairs, and the whole body within MAX_BODY). */
function requestBody(turn) {
  const body = {
    robotId: ui.robot.value || "1",
    aiQuestion: turn.question,
    aiQuestionHistory: [],
  };
  const pairs = [];
  for (const t of turns) {
    if (t === turn) break;
    if (t.answer) pairs.push([t.question, t.answer]);
  }
  const room = MAX_BODY - utf8Length(JSON.stringify(body));
  const size = (pair) => utf8Length(JSON.stringify(pair)) + 1; // and its comma
  body.aiQuestionHistory = tailWithin(pairs.slice(-MAX_PAIRS), size, room);
  return JSON.stringify(body);
}

/** Run a turn: a new answer, or (`resuming`, after a reload) the one it was streaming. */
async function run(turn, resuming = false) {
  if (current) return;
  if (!resuming) {
    turn.reset();
    const body = requestBody(turn);
    // A fresh key per run: a Retry or Regenerate is a new answer.
    turn.live = ui.resumable.checked
      ? { mode: "resumable", body }
      : { mode: "oneshot", body, key: newKey() };
  }
  const job = { turn, stop: () => {} };
  current = job;
  setBusy(true);
  saveChat();
  if (!resuming) store.set(KEYS.request, turn.live.body);
  saveLive();
  const transport = turn.live.mode === "resumable" ? runSession : runOneShot;
  try {
    const outcome = await transport(turn, turn.live, job);
    turn.end(outcome);
  } catch (e) {
    const error = e instanceof TurnError ? e : new TurnError(String(e?.message || e));
    turn.end("error", error);
  } finally {
    turn.live = null;
    current = null;
    // Leaving cuts the page's requests, and so ends this run: what pagehide saved stands.
    if (!leaving) {
      forgetLive();
      saveChat();
    }
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
  store.remove(KEYS.chat);
  forgetLive();
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
  document.addEventListener("pointerdown", () => (pressing = true), true);
  document.addEventListener("pointerup", pressEnded, true);
  document.addEventListener("pointercancel", pressEnded, true);
  window.addEventListener("blur", pressEnded); // released outside the window: no pointerup

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
  // A code block's Copy button: rendered with the Markdown, so handled here, once.
  ui.turns.addEventListener("click", (e) => {
    const copy = e.target.closest(".code-copy");
    if (copy) {
      copyWithFeedback(copy, copy.closest(".code-block").querySelector("code").textContent);
    }
  });
  // The freshest text and event id for the reload that may follow. From beforeunload on:
  // a navigation cuts the page's streams as it starts (EventSource's at once), before
  // pagehide, and the run they end must not save that end over the answer to resume.
  const leave = () => {
    saveLive();
    leaving = true;
  };
  addEventListener("beforeunload", leave);
  addEventListener("pagehide", leave);
  addEventListener("pageshow", (e) => {
    if (e.persisted) leaving = false; // back from the back-forward cache
  });

  restore();
  // Announce answers from now on, not the conversation restored at load.
  ui.turns.setAttribute("aria-live", "polite");
  setBusy(Boolean(current)); // and Regenerate on the last answer restored
  loadRobots();
  ui.question.focus();
  document.documentElement.dataset.ready = "1";
}

init();

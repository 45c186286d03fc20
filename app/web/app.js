// memchat web page: sessions, a streamed chat and a live view of the session's memory.
// Plain ES module, no dependencies; every request goes to this page's own origin.

const $ = (sel) => document.querySelector(sel);

const el = {
  status: $("#status"),
  auth: $("#auth"),
  apiKey: $("#api-key"),
  error: $("#error"),
  errorText: $("#error-text"),
  errorClose: $("#error-close"),
  newSession: $("#new-session"),
  sessionList: $("#session-list"),
  importFile: $("#import-file"),
  noSession: $("#no-session"),
  sessionBar: $("#session-bar"),
  renameForm: $("#rename-form"),
  renameInput: $("#rename-input"),
  sessionInfo: $("#session-info"),
  deleteSession: $("#delete-session"),
  transcriptLog: $("#transcript-log"),
  transcript: $("#transcript"),
  composer: $("#composer"),
  input: $("#composer-input"),
  maxTokens: $("#max-tokens"),
  send: $("#send"),
  stop: $("#stop"),
  memorySummary: $("#memory-summary"),
  memoryList: $("#memory-list"),
  refreshMemory: $("#refresh-memory"),
  exportSession: $("#export-session"),
  forgetAll: $("#forget-all"),
  readHeatmap: $("#read-heatmap"),
  explainForm: $("#explain-form"),
  explainInput: $("#explain-input"),
  explainHeatmap: $("#explain-heatmap"),
};

const state = {
  sessions: [],
  session: null, // the selected session (SessionOut)
  memory: null, // MemoryOut of the selected session
  lastRead: null, // MemoryRead of the last reply
  explainRead: null, // MemoryRead of the last "explain"
  locations: new Map(), // message id -> window | memory | forgotten | dropped (transcript)
  band: "all",
  streaming: null, // {controller} while a reply streams
};

// ----- HTTP -------------------------------------------------------------------------------

class ApiError extends Error {}

/** The message of an API error body ({"error": {"message"}}), or a fallback. */
function errorMessage(body, fallback) {
  const err = body && body.error;
  if (err && err.message) return err.param ? `${err.message} (${err.param})` : err.message;
  return fallback;
}

// The API key (when the server wants one) is kept in this browser and sent on every request.
const KEY_STORE = "memchat.apiKey";

function withKey(headers = {}) {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { ...headers, authorization: `Bearer ${key}` } : headers;
}

/** A 401: ask for a key (the request's own error is shown too). */
function checkAuth(resp) {
  if (resp.status !== 401) return;
  el.auth.hidden = false;
  el.apiKey.focus();
}

async function api(method, path, body) {
  const init = { method, headers: withKey() };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (exc) {
    throw new ApiError(`the server did not answer: ${exc.message}`);
  }
  checkAuth(resp);
  if (resp.status === 204) return null;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) throw new ApiError(errorMessage(data, `${method} ${path}: HTTP ${resp.status}`));
  return data;
}

function showError(exc) {
  const message = exc instanceof Error ? exc.message : String(exc);
  el.errorText.textContent = message;
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

/** Run an async UI action; its failure is shown to the user. */
async function guarded(action) {
  try {
    return await action();
  } catch (exc) {
    showError(exc);
    return undefined;
  }
}

const sid = () => encodeURIComponent(state.session.id);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const pct = (x) => `${(100 * x).toFixed(x > 0 && x < 0.001 ? 2 : 1)}%`;

// ----- sessions ---------------------------------------------------------------------------

async function loadSessions() {
  const list = await api("GET", "/v1/sessions?limit=200");
  state.sessions = list.data;
  renderSessions();
}

function renderSessions() {
  el.sessionList.replaceChildren(
    ...state.sessions.map((s) => {
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "session-item";
      btn.dataset.sessionId = s.id;
      if (state.session && state.session.id === s.id) btn.setAttribute("aria-current", "true");
      const title = document.createElement("span");
      title.className = "session-title";
      title.textContent = s.title || "(untitled)";
      const meta = document.createElement("span");
      meta.className = "muted small";
      meta.textContent = `${s.messages} messages · window ${s.window}`;
      btn.append(title, meta);
      btn.addEventListener("click", () => guarded(() => selectSession(s.id)));
      li.append(btn);
      return li;
    }),
  );
}

async function selectSession(id) {
  if (state.streaming) return;
  const session = await api("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  state.session = session;
  state.memory = null;
  state.lastRead = null;
  state.explainRead = null;
  state.locations = new Map();
  history.replaceState(null, "", `#session=${encodeURIComponent(id)}`);
  renderSessionBar();
  renderSessions();
  renderHeatmap(el.explainHeatmap, null, "Type a text and press Explain.");
  await Promise.all([loadTranscript(), loadMemory(), loadLastRead()]);
}

function clearSession() {
  state.session = null;
  state.memory = null;
  state.lastRead = null;
  state.explainRead = null;
  state.locations = new Map();
  history.replaceState(null, "", location.pathname);
  renderSessionBar();
  el.transcript.replaceChildren();
  renderMemory();
  renderHeatmap(el.readHeatmap, null, "");
  renderHeatmap(el.explainHeatmap, null, "");
}

function renderSessionBar() {
  const s = state.session;
  el.noSession.hidden = Boolean(s);
  el.sessionBar.hidden = !s;
  el.composer.hidden = !s;
  for (const b of [el.refreshMemory, el.exportSession, el.forgetAll]) b.disabled = !s;
  el.explainForm.querySelector("button").disabled = !s;
  if (!s) return;
  el.renameInput.value = s.title;
  const memory = s.memory_enabled ? "memory on" : "memory off";
  el.sessionInfo.textContent = `window ${s.window} tokens · turn ${s.turn} · ${memory}`;
}

async function refreshSession() {
  if (!state.session) return;
  state.session = await api("GET", `/v1/sessions/${sid()}`);
  renderSessionBar();
  await loadSessions();
}

el.newSession.addEventListener("submit", (ev) => {
  ev.preventDefault();
  guarded(async () => {
    clearError();
    const body = {};
    const title = $("#new-title").value.trim();
    const size = $("#new-window").value.trim();
    const system = $("#new-system").value.trim();
    if (title) body.title = title;
    if (size) body.window = Number(size);
    if (system) body.system_prompt = system;
    const created = await api("POST", "/v1/sessions", body);
    el.newSession.reset();
    await loadSessions();
    await selectSession(created.id);
    el.input.focus();
  });
});

el.renameForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  guarded(async () => {
    clearError();
    await api("PATCH", `/v1/sessions/${sid()}`, { title: el.renameInput.value.trim() });
    await refreshSession();
    setStatus("Session renamed.");
  });
});

el.deleteSession.addEventListener("click", () => {
  if (!state.session || state.streaming) return;
  const title = state.session.title || "this session";
  if (!confirm(`Delete "${title}" with its transcript and memory?`)) return;
  guarded(async () => {
    clearError();
    await api("DELETE", `/v1/sessions/${sid()}`);
    clearSession();
    await loadSessions();
    setStatus("Session deleted.");
  });
});

el.importFile.addEventListener("change", () => {
  const file = el.importFile.files[0];
  if (!file) return;
  guarded(async () => {
    clearError();
    const text = await file.text();
    try {
      JSON.parse(text);
    } catch {
      throw new ApiError(`${file.name} is not a JSON file`);
    }
    const created = await api("POST", "/v1/sessions/import", text);
    await loadSessions();
    await selectSession(created.id);
    setStatus(`Imported "${created.title}".`);
  }).finally(() => {
    el.importFile.value = "";
  });
});

el.exportSession.addEventListener("click", () =>
  guarded(async () => {
    clearError();
    const resp = await fetch(`/v1/sessions/${sid()}/export`, { headers: withKey() });
    checkAuth(resp);
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      throw new ApiError(errorMessage(body, `export: HTTP ${resp.status}`));
    }
    const disposition = resp.headers.get("content-disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    const url = URL.createObjectURL(await resp.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = match ? match[1] : `memchat-${state.session.id}.json`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    setStatus("Session exported.");
  }),
);

// ----- transcript and chat ------------------------------------------------------------------

async function loadTranscript() {
  const path = `/v1/sessions/${sid()}/messages`;
  let page = await api("GET", `${path}?limit=1000`);
  if (page.total > page.data.length) {
    page = await api("GET", `${path}?limit=1000&offset=${page.total - 1000}`);
  }
  state.locations = new Map(page.data.map((m) => [m.id, m.location]));
  renderHeatmap(el.readHeatmap, state.lastRead, "No memory read yet in this session.");
  if (state.explainRead) renderHeatmap(el.explainHeatmap, state.explainRead, "");
  el.transcript.replaceChildren(
    ...page.data
      .filter((m) => !(m.role === "system" && !m.content))
      .map((m) => messageItem(m.role, m.content, m)),
  );
  scrollTranscript();
}

function messageItem(role, content, meta) {
  const li = document.createElement("li");
  li.className = `msg msg-${role}`;
  const head = document.createElement("div");
  head.className = "msg-head";
  const who = document.createElement("span");
  who.className = "msg-role";
  who.textContent = role === "assistant" ? "Assistant" : role === "user" ? "You" : "System";
  head.append(who);
  if (meta) {
    li.dataset.messageId = meta.id;
    const info = document.createElement("span");
    info.className = `badge loc-${meta.location}`;
    info.textContent = meta.location;
    info.title =
      `message ${meta.id}, turn ${meta.turn}, ${meta.tokens} tokens, now in: ${meta.location}`;
    head.append(info);
  }
  const body = document.createElement("div");
  body.className = "msg-text";
  body.textContent = content;
  li.append(head, body);
  return li;
}

function scrollTranscript() {
  el.transcriptLog.scrollTop = el.transcriptLog.scrollHeight;
}

/** Parse a Server-Sent Events body from a fetch response; calls onEvent(name, data). */
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let name = "message";
  let data = [];
  const dispatch = () => {
    if (data.length) {
      const text = data.join("\n");
      let value = text;
      try {
        value = JSON.parse(text);
      } catch {
        // plain text data
      }
      onEvent(name, value);
    }
    name = "message";
    data = [];
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") dispatch();
      else if (line.startsWith(":")) continue; // comment (keep-alive ping)
      else if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
  }
  if (buffer) {
    if (buffer.startsWith("data:")) data.push(buffer.slice(5).replace(/^ /, ""));
  }
  dispatch();
}

function setStreaming(controller) {
  state.streaming = controller ? { controller } : null;
  el.send.disabled = Boolean(controller);
  el.stop.disabled = !controller;
  el.deleteSession.disabled = Boolean(controller);
  el.transcriptLog.setAttribute("aria-busy", controller ? "true" : "false");
}

async function send() {
  if (!state.session || state.streaming) return;
  const text = el.input.value;
  if (!text.trim()) return;
  clearError();
  const body = { message: text, stream: true };
  const maxTokens = el.maxTokens.value.trim();
  if (maxTokens) body.max_tokens = Number(maxTokens);

  const userItem = messageItem("user", text);
  const replyItem = messageItem("assistant", "");
  replyItem.classList.add("streaming");
  replyItem.id = "streaming-reply";
  const replyText = replyItem.querySelector(".msg-text");
  el.transcript.append(userItem, replyItem);
  el.input.value = "";
  scrollTranscript();

  const controller = new AbortController();
  document.body.dataset.turn = "busy";
  setStreaming(controller);
  setStatus("Replying…");
  let finished = null;
  let failed = null;
  try {
    const resp = await fetch(`/v1/sessions/${sid()}/chat`, {
      method: "POST",
      headers: withKey({ "content-type": "application/json", accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    checkAuth(resp);
    if (!resp.ok) {
      const data = await resp.json().catch(() => null);
      throw new ApiError(errorMessage(data, `chat: HTTP ${resp.status}`));
    }
    await readEvents(resp, (name, data) => {
      if (name === "delta") {
        replyText.textContent += data.text;
        scrollTranscript();
      } else if (name === "done") {
        finished = data;
      } else if (name === "error") {
        failed = new ApiError(errorMessage(data, "the reply failed"));
      }
    });
    if (failed) throw failed;
    if (!finished) throw new ApiError("the reply ended without its done event");
  } catch (exc) {
    if (exc.name === "AbortError") {
      setStatus("Stopped; the reply so far is kept.");
    } else {
      showError(exc);
      setStatus("");
      if (!replyText.textContent) {
        userItem.remove();
        replyItem.remove();
        el.input.value = text; // nothing was said: give the text back
      }
    }
  } finally {
    replyItem.classList.remove("streaming");
    setStreaming(null);
  }
  if (finished) {
    state.lastRead = finished.memory_read;
    renderHeatmap(el.readHeatmap, state.lastRead, "The memory read attended to nothing.");
    const t = finished.timings;
    setStatus(
      `Reply done (${finished.finish_reason}, ${finished.usage.completion_tokens} tokens, ` +
        `${t.total_s.toFixed(1)} s).`,
    );
  }
  // the memory first: its request waits for the turn to be committed (also after a stop)
  await guarded(async () => {
    await loadMemory();
    await Promise.all([loadTranscript(), loadLastRead(), refreshSession()]);
  });
  document.body.dataset.turn = "idle"; // the turn and the refresh after it are over
}

el.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  send();
});

el.input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.ctrlKey && !ev.altKey && !ev.metaKey) {
    if (ev.isComposing) return;
    ev.preventDefault();
    send();
  } else if (ev.key === "Escape" && state.streaming) {
    ev.preventDefault();
    state.streaming.controller.abort();
  }
});

el.stop.addEventListener("click", () => {
  if (state.streaming) state.streaming.controller.abort();
  el.input.focus();
});

// ----- memory -----------------------------------------------------------------------------

async function loadMemory() {
  if (!state.session) return;
  state.memory = await api("GET", `/v1/sessions/${sid()}/memory?limit=1000`);
  renderMemory();
}

function renderMemory() {
  const m = state.memory;
  if (!m) {
    el.memorySummary.textContent = state.session ? "" : "No session selected.";
    el.memoryList.replaceChildren();
    return;
  }
  const shown = m.messages.length < m.total ? ` (first ${m.messages.length} shown)` : "";
  el.memorySummary.textContent =
    `Turn ${m.turn} · ${plural(m.total, "message")}, ${plural(m.tokens, "token")} ` +
    `remembered${shown} · ` +
    `window ${m.window.tokens}/${m.window.size} tokens`;
  if (!m.messages.length) {
    const li = document.createElement("li");
    li.className = "muted empty-item";
    li.textContent = "Nothing remembered: messages come here when they leave the window.";
    el.memoryList.replaceChildren(li);
    return;
  }
  const reads = state.lastRead ? state.lastRead.messages : [];
  const readOf = new Map(reads.map((r) => [r.message_id, r]));
  const items = m.messages.map((msg) => memoryItem(msg, readOf.get(msg.message_id)));
  el.memoryList.replaceChildren(...items);
}

function memoryItem(msg, read) {
  const li = document.createElement("li");
  li.className = "mem-item";
  li.dataset.messageId = msg.message_id;
  const strength = Math.max(0, Math.min(1, msg.mean_strength));

  const head = document.createElement("div");
  head.className = "mem-head";
  const who = document.createElement("span");
  who.className = "msg-role";
  who.textContent = `#${msg.message_id} ${msg.role}`;
  const facts = document.createElement("span");
  facts.className = "muted small";
  facts.textContent = `age ${plural(msg.age_turns, "turn")} · ${plural(msg.tokens, "token")}`;
  head.append(who, facts);
  if (read) {
    const mark = document.createElement("span");
    mark.className = "badge read-mark";
    mark.textContent = `read ${pct(bandWeight(read))}`;
    mark.title = "share of the last memory read";
    head.append(mark);
  }

  const text = document.createElement("div");
  text.className = "mem-text";
  text.textContent = msg.content;

  const bar = document.createElement("div");
  bar.className = "strength";
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-label", `Strength of message ${msg.message_id}`);
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-valuenow", String(Math.round(strength * 100)));
  bar.setAttribute("aria-valuetext", `${Math.round(strength * 100)}%`);
  bar.title = `strength ${strength.toFixed(3)} (weakest entry ${msg.min_strength.toFixed(3)})`;
  const fill = document.createElement("div");
  fill.className = "strength-fill";
  fill.style.width = `${(strength * 100).toFixed(1)}%`;
  fill.style.opacity = String(0.2 + 0.8 * strength);
  bar.append(fill);

  const forget = document.createElement("button");
  forget.type = "button";
  forget.className = "forget small-button";
  forget.textContent = "Forget";
  forget.setAttribute("aria-label", `Forget message ${msg.message_id}`);
  forget.addEventListener("click", () =>
    guarded(async () => {
      clearError();
      await api("DELETE", `/v1/sessions/${sid()}/memory/messages/${msg.message_id}`);
      await loadMemory();
      await loadTranscript();
      setStatus(`Message ${msg.message_id} forgotten.`);
    }),
  );

  const row = document.createElement("div");
  row.className = "mem-row";
  row.append(bar, forget);
  li.append(head, text, row);
  return li;
}

el.refreshMemory.addEventListener("click", () =>
  guarded(async () => {
    clearError();
    await Promise.all([loadMemory(), loadLastRead()]);
  }),
);

el.forgetAll.addEventListener("click", () => {
  if (!state.session) return;
  if (!confirm("Forget every remembered message of this session? The transcript stays.")) return;
  guarded(async () => {
    clearError();
    const out = await api("DELETE", `/v1/sessions/${sid()}/memory`);
    await loadMemory();
    await loadTranscript();
    setStatus(`Memory cleared (${out.removed_entries} entries removed).`);
  });
});

// ----- memory reads as heatmaps -------------------------------------------------------------

async function loadLastRead() {
  if (!state.session) return;
  state.lastRead = await api("GET", `/v1/sessions/${sid()}/memory/last-read?top_tokens=200`);
  renderHeatmap(el.readHeatmap, state.lastRead, "No memory read yet in this session.");
  renderMemory();
}

function bandWeight(item) {
  return state.band === "all" ? item.weight : item.bands[state.band];
}

/** Background of a heat cell: transparent at 0, full heat colour at 1. */
function heat(x) {
  const a = Math.max(0, Math.min(1, x));
  return `rgb(var(--heat-rgb) / ${(0.08 + 0.92 * Math.sqrt(a)).toFixed(3)})`;
}

function renderHeatmap(container, read, emptyText) {
  container.replaceChildren();
  if (!read || !read.messages.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = emptyText;
    container.append(p);
    return;
  }
  const share = document.createElement("p");
  share.className = "muted small";
  share.textContent =
    (read.memory_share > 0 ? `Memory got ${pct(read.memory_share)} of all attention; ` : "") +
    "shares below are within the memory read.";
  container.append(share);

  const messages = [...read.messages].sort((a, b) => bandWeight(b) - bandWeight(a));
  const top = Math.max(...messages.map(bandWeight), 1e-9);
  const tokensOf = new Map();
  for (const t of read.tokens) {
    if (!tokensOf.has(t.message_id)) tokensOf.set(t.message_id, []);
    tokensOf.get(t.message_id).push(t);
  }
  const topToken = Math.max(...read.tokens.map(bandWeight), 1e-9);

  const list = document.createElement("ul");
  list.className = "heat-list";
  for (const m of messages) {
    const w = bandWeight(m);
    const li = document.createElement("li");
    li.className = "heat-row";
    li.dataset.messageId = m.message_id;
    li.dataset.weight = w.toFixed(6);

    const head = document.createElement("div");
    head.className = "heat-head";
    const cell = document.createElement("span");
    cell.className = "heat-cell";
    cell.style.background = heat(w / top);
    cell.textContent = pct(w);
    const who = document.createElement("span");
    who.className = "msg-role";
    who.textContent = `#${m.message_id} ${m.role}`;
    head.append(cell, who);
    const where = state.locations.get(m.message_id);
    if (where === "forgotten" || where === "dropped") {
      const gone = document.createElement("span");
      gone.className = `badge loc-${where}`;
      gone.textContent = where;
      gone.title = "no longer in the memory";
      head.append(gone);
    }

    const text = document.createElement("div");
    text.className = "heat-text";
    text.textContent = m.content;

    const chips = document.createElement("div");
    chips.className = "tokens";
    const toks = (tokensOf.get(m.message_id) || []).sort((a, b) => a.position - b.position);
    chips.setAttribute("aria-label", `Attended tokens of message ${m.message_id}`);
    for (const t of toks) {
      const tw = bandWeight(t);
      const chip = document.createElement("span");
      chip.className = "tok";
      chip.textContent = t.token;
      chip.style.background = heat(tw / topToken);
      chip.title = `position ${t.position}: ${pct(tw)}`;
      chips.append(chip);
    }
    li.append(head, text);
    if (toks.length) li.append(chips);
    list.append(li);
  }
  container.append(list);
}

for (const radio of document.querySelectorAll('input[name="band"]')) {
  radio.addEventListener("change", () => {
    state.band = radio.value;
    renderHeatmap(el.readHeatmap, state.lastRead, "No memory read yet in this session.");
    renderHeatmap(el.explainHeatmap, state.explainRead, "Type a text and press Explain.");
    renderMemory();
  });
}

el.explainForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = el.explainInput.value;
  if (!state.session || !text.trim()) return;
  guarded(async () => {
    clearError();
    state.explainRead = await api("POST", `/v1/sessions/${sid()}/memory/query`, {
      text,
      top_tokens: 200,
    });
    renderHeatmap(
      el.explainHeatmap,
      state.explainRead,
      "The memory read would attend to nothing (is the memory empty?).",
    );
  });
});

el.explainInput.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    el.explainForm.requestSubmit();
  }
});

// ----- start --------------------------------------------------------------------------------

function setStatus(text) {
  el.status.textContent = text;
}

el.errorClose.addEventListener("click", clearError);

el.auth.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = el.apiKey.value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORE, key);
  el.apiKey.value = "";
  el.auth.hidden = true;
  clearError();
  guarded(loadSessions);
});

async function waitReady() {
  for (;;) {
    const resp = await fetch("/readyz").catch(() => null);
    if (resp && resp.ok) return;
    const body = resp ? await resp.json().catch(() => null) : null;
    const model = body && body.checks ? body.checks.model : "unreachable";
    setStatus(`Server not ready (model: ${model}); retrying…`);
    if (model && model.startsWith("failed")) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function start() {
  renderSessionBar();
  renderMemory();
  await waitReady();
  setStatus("");
  await guarded(loadSessions);
  const wanted = new URLSearchParams(location.hash.slice(1)).get("session");
  if (wanted && state.sessions.some((s) => s.id === wanted)) {
    await guarded(() => selectSession(wanted));
  }
  document.body.dataset.ready = "true";
}

start();

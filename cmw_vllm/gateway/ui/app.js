// The cmw-vllm dashboard: renders GET /api/state, follows GET /api/events (reconnecting by
// itself), and calls the control API. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const view = { state: null, receivedAt: 0, source: null, logs: {}, logModel: "", retry: null };
const BADGE = { running: "healthy", startable: "stopped" };
const MAX_LOG = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i >= 3 ? 1 : 0)} ${units[i]}`;
}

function hue(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

function setConn(kind) {
  const c = $("conn");
  c.textContent = kind;
  c.className = `conn conn-${kind}`;
}

// ------------------------------------------------------------------------------ access

async function start() {
  let resp;
  try {
    // Asked first: it answers 200 with or without access (no error in the console).
    const session = await (await fetch("/api/session", { credentials: "same-origin", cache: "no-store" })).json();
    if (!session.access) {
      showLogin(session.login ? "" : `${session.message}${session.hint ? " — " + session.hint : ""}`, session.login);
      return;
    }
    resp = await fetch("/api/state", { credentials: "same-origin", cache: "no-store" });
  } catch (err) {
    setConn("disconnected");
    scheduleRetry();
    return;
  }
  if (resp.status === 401) { showLogin("", true); return; }
  if (!resp.ok) { setConn("disconnected"); scheduleRetry(); return; }
  showDashboard(await resp.json());
  connect();
}

function scheduleRetry() {
  clearTimeout(view.retry);
  view.retry = setTimeout(start, 2000);
}

function showLogin(note, canLogIn) {
  if (view.source) { view.source.close(); view.source = null; }
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-form").hidden = canLogIn === false;
  setConn("disconnected");
  if (note) $("login-note").textContent = note;
  if (canLogIn !== false) $("key").focus();
}

function showDashboard(state) {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("logout").hidden = !state.gateway.admin_key;
  render(state);
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  const key = $("key").value.trim();
  const resp = await fetch("/api/login", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key }),
  }).catch(() => null);
  if (!resp || !resp.ok) {
    const body = resp ? await resp.json().catch(() => ({})) : {};
    $("login-error").textContent = (body.error && body.error.message) || "cannot log in";
    return;
  }
  $("key").value = "";
  start();
}

async function logout() {
  await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => null);
  showLogin("", true);
}

// ------------------------------------------------------------------------------ events

function connect() {
  if (view.source) view.source.close();
  setConn("connecting");
  const source = new EventSource("/api/events");
  view.source = source;
  source.addEventListener("open", () => setConn("connected"));
  source.addEventListener("state", (e) => render(JSON.parse(e.data)));
  source.addEventListener("sample", (e) => sample(JSON.parse(e.data)));
  source.addEventListener("log", (e) => logLines(JSON.parse(e.data)));
  source.addEventListener("error", () => {
    if (view.source !== source) return;
    setConn(source.readyState === EventSource.CLOSED ? "disconnected" : "connecting");
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (an error status, e.g. the session ended): ask again.
      view.source = null;
      scheduleRetry();
    }
  });
}

// ------------------------------------------------------------------------------ actions

async function act(name, what, body) {
  $("action-error").textContent = "";
  const resp = await fetch(`/api/models/${encodeURIComponent(name)}/${what}`, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}),
  }).catch(() => null);
  if (!resp) { $("action-error").textContent = `${what} ${name}: the gateway does not answer`; return; }
  if (resp.status === 401) { showLogin("", true); return; }
  if (!resp.ok) {
    const data = await resp.json().catch(() => ({}));
    const err = data.error || {};
    $("action-error").textContent = `${what} ${name}: ${err.message || resp.status}` +
      (err.hint ? ` (${err.hint})` : "");
  }
}

// ------------------------------------------------------------------------------ render

function badgeText(m, now) {
  if (m.state === "starting") {
    const pct = m.progress !== null && m.progress !== undefined ? ` ${Math.round(m.progress * 100)}%` : "";
    return `starting: ${m.phase || "preparing"}${pct}`;
  }
  if (m.state === "running" && m.idle_stop_in !== null && m.idle_stop_in !== undefined) {
    const left = Math.max(0, Math.round(m.idle_stop_in - (now - view.receivedAt) / 1000));
    if (left <= 60) return `idle-stopping in ${left} s`;
  }
  if (m.state === "failed") return "failed";
  return BADGE[m.state] || m.state;
}

function badgeClass(m) {
  if (m.state === "running" && m.idle_stop_in !== null && m.idle_stop_in <= 60) return "badge badge-idle";
  return `badge badge-${m.state}`;
}

function spark(history) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 20");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const values = history || [];
  svg.setAttribute("aria-label", values.length ? `tokens per second, last ${values[values.length - 1]}` : "no samples yet");
  if (values.length > 1) {
    const top = Math.max(...values, 1);
    const step = 100 / (values.length - 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(19 - (v / top) * 18).toFixed(1)}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  return svg;
}

function modelRow(m, now) {
  const load = m.load || {};
  const kv = load.kv_cache !== null && load.kv_cache !== undefined ? `${(load.kv_cache * 100).toFixed(1)}%` : "-";
  const gpus = (m.gpus || []).map((g) => `GPU ${g.index} (${bytes(g.memory)})`).join(", ") || "no GPU";
  const live = ["running", "unhealthy", "draining", "stopping"].includes(m.state);
  const badge = el("span", { class: badgeClass(m), "data-name": m.name, text: badgeText(m, now) });
  const status = el("div", {}, badge);
  if (m.state === "starting" && m.progress !== null && m.progress !== undefined) {
    const bar = el("div", { class: "progress", role: "progressbar", "aria-label": `${m.name} start progress`,
      "aria-valuenow": Math.round(m.progress * 100), "aria-valuemin": 0, "aria-valuemax": 100 }, el("div"));
    bar.firstChild.style.width = `${Math.round(m.progress * 100)}%`;
    status.append(bar);
  }
  const row = el("div", { class: "model", "data-model": m.name },
    el("div", {}, el("div", { class: "name", text: m.name }),
      el("div", { class: "sub", text: m.model || "" })),
    status,
    el("div", { class: "figures" },
      el("div", {}, "GPUs: ", el("b", { text: gpus })),
      el("div", {}, "KV cache: ", el("b", { text: kv }), " · running ", el("b", { text: String(load.running ?? m.in_flight ?? "-") }),
        " · waiting ", el("b", { text: String(load.waiting ?? m.waiting ?? "-") }))),
    el("div", { class: "figures" }, el("div", { text: load.tokens_per_s !== null && load.tokens_per_s !== undefined ? `${load.tokens_per_s} tok/s` : "tok/s -" }), spark(load.history)),
    el("div", { class: "actions" },
      el("button", { type: "button", "aria-label": `Load ${m.name}`, text: "Load",
        disabled: live || m.state === "starting", onclick: () => act(m.name, "load") }),
      el("button", { type: "button", "aria-label": `Unload ${m.name}`, text: "Unload",
        disabled: !live || !m.owned, onclick: () => act(m.name, "unload") }),
      el("button", { type: "button", "aria-label": `Pin ${m.name}`, "aria-pressed": m.pinned ? "true" : "false",
        class: m.pinned ? "pin-on" : "", text: m.pinned ? "Pinned" : "Pin",
        onclick: () => act(m.name, "pin", { pinned: !m.pinned }) })));
  if (m.failure) {
    row.append(el("div", { class: "failure", text: `Start failed (${m.failure.failures}×, next try in ${m.failure.retry_in} s): ${m.failure.message}${m.failure.hint ? " — " + m.failure.hint : ""}` }));
  }
  return row;
}

function gpuBars(gpus) {
  const box = $("gpus");
  box.replaceChildren();
  if (!gpus.available || !gpus.devices.length) {
    box.append(el("p", { class: "sub", text: gpus.reason || "no GPU" }));
    return;
  }
  for (const g of gpus.devices) {
    const total = g.memory_total || 1;
    const bar = el("div", { class: "bar", role: "img", "data-gpu": g.index,
      "aria-label": `GPU ${g.index} memory: ${bytes(g.memory_used)} used of ${bytes(g.memory_total)}` });
    const legend = el("div", { class: "legend" });
    const part = (cls, width, color, label) => {
      const seg = el("div", { class: cls, title: label });
      seg.style.width = `${Math.max(0, (width / total) * 100)}%`;
      if (color) seg.style.background = color;
      bar.append(seg);
      const sw = el("span", { class: `swatch ${cls}` });
      if (color) sw.style.background = color;
      legend.append(el("span", {}, sw, label));
    };
    for (const [name, used] of Object.entries(g.servers || {})) {
      part("seg-server", used, `hsl(${hue(name)} 60% 50%)`, `${name} ${bytes(used)}`);
    }
    if (g.other) part("seg-other", g.other, null, `other programs ${bytes(g.other)}`);
    legend.append(el("span", { text: `free ${bytes(g.memory_free)}` }));
    box.append(el("div", { class: "gpu" },
      el("div", {}, el("b", { text: `GPU ${g.index}` }), ` ${g.name || ""} · ${bytes(g.memory_used)} / ${bytes(g.memory_total)}`),
      bar, legend));
  }
}

function render(state) {
  view.state = state;
  view.receivedAt = Date.now();
  $("gateway-name").textContent = state.gateway.name;
  const now = Date.now();
  $("models").replaceChildren(...state.models.map((m) => modelRow(m, now)));
  gpuBars(state.gpus);
  const select = $("log-model");
  const names = state.models.map((m) => m.name);
  const current = select.value || view.logModel;
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  const pick = names.includes(current) ? current : (state.models.find((m) => m.state !== "startable") || {}).name || names[0] || "";
  select.value = pick;
  if (pick !== view.logModel) followLog(pick);
}

function sample(s) {
  if (!view.state) return;
  const m = view.state.models.find((x) => x.name === s.name);
  if (!m) return;
  m.load = s;
  const row = document.querySelector(`.model[data-model="${CSS.escape(s.name)}"]`);
  if (row) row.replaceWith(modelRow(m, Date.now()));
}

function tickCountdowns() {
  if (!view.state) return;
  const now = Date.now();
  for (const m of view.state.models) {
    if (m.state !== "running" && m.state !== "starting") continue;
    const badge = document.querySelector(`.badge[data-name="${CSS.escape(m.name)}"]`);
    if (badge) { badge.textContent = badgeText(m, now); badge.className = badgeClass(m); }
  }
}

// ------------------------------------------------------------------------------ logs

async function followLog(name) {
  view.logModel = name;
  view.logs[name] = [];
  if (!name) { drawLog(); return; }
  const resp = await fetch(`/api/models/${encodeURIComponent(name)}/logs?n=300`, { credentials: "same-origin" }).catch(() => null);
  if (resp && resp.ok && view.logModel === name) {
    view.logs[name] = (await resp.json()).lines;
  }
  drawLog();
}

function logLines(data) {
  const lines = view.logs[data.name];
  if (!lines) return;
  lines.push(...data.lines);
  if (lines.length > MAX_LOG) lines.splice(0, lines.length - MAX_LOG);
  if (data.name === view.logModel) drawLog();
}

function matcher() {
  const text = $("log-filter").value;
  if (!text) return () => true;
  const re = /^\/(.+)\/$/.exec(text);
  if (re) {
    try { const r = new RegExp(re[1], "i"); return (l) => r.test(l); } catch (err) { /* not a regex */ }
  }
  const low = text.toLowerCase();
  return (l) => l.toLowerCase().includes(low);
}

function drawLog() {
  const pre = $("log");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
  const ok = matcher();
  pre.textContent = (view.logs[view.logModel] || []).filter(ok).join("\n");
  if (atEnd) pre.scrollTop = pre.scrollHeight;  // follow, unless the user scrolled up
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("log-model").addEventListener("change", (e) => followLog(e.target.value));
  $("log-filter").addEventListener("input", drawLog);
  setInterval(tickCountdowns, 1000);
  start();
});

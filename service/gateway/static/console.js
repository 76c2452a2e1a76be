// The console: the caller's triggers, one trigger's record, history and live counters, and the
// gateway routes' recent status mix, from the sidecar's /console/api/ endpoints with the caller's
// bearer token. Everything shown is set as text (never as HTML): records hold the callers' strings.
"use strict";

const REFRESH_MS = 5000;
const CLASSES = ["2xx", "3xx", "4xx", "5xx"];
const $ = (id) => document.getElementById(id);
const saved = sessionStorage.getItem("trigger-console-token");
// `started`: a token was given (an empty one too, for a sidecar without authentication).
const state = { token: saved || "", started: saved !== null, cursor: null, selected: null };

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.append(cell instanceof Node ? wrap(cell) : el("td", cell));
  return tr;
}

function wrap(node) {
  const td = document.createElement("td");
  td.append(node);
  return td;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function api(path, params) {
  const url = new URL(path, document.baseURI);
  for (const [key, value] of Object.entries(params || {})) if (value) url.searchParams.set(key, value);
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(url, { headers, cache: "no-store" });
  const envelope = await response.json().catch(() => ({ error: "HTTP " + response.status }));
  if (!response.ok) throw new Error(envelope.error || "HTTP " + response.status);
  return envelope.body;
}

function filters() {
  const form = new FormData($("filters"));
  return Object.fromEntries([...form.entries()].filter(([, value]) => value));
}

function classCounts(traffic) {
  const counts = { "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0 };
  for (const [status, n] of Object.entries((traffic && traffic.statuses) || {})) {
    const key = status[0] + "xx";
    if (key in counts) counts[key] += n;
  }
  return counts;
}

function mixBar(traffic) {
  const counts = classCounts(traffic);
  const total = CLASSES.reduce((sum, c) => sum + counts[c], 0);
  const bar = el("div", null, "mix");
  bar.title = total ? CLASSES.map((c) => `${c}: ${counts[c]}`).join(", ") : "no requests";
  for (const c of CLASSES) {
    if (!counts[c]) continue;
    const part = el("span", null, "c" + c);
    part.style.width = (100 * counts[c]) / total + "%";
    bar.append(part);
  }
  return bar;
}

function carries(record) {
  if (record.trigger_type === "gateway") {
    const m = record.gateway_mapping || {};
    return `${m.method} ${m.path}`;
  }
  if (record.trigger_type === "stream") {
    const target = record.target || {};
    return `${record.source.subject} → ${target.local_subject || target.subject || record.source.subject}`;
  }
  return "";
}

function recent(traffic) {
  if (!traffic) return "";
  const counts = classCounts(traffic);
  return CLASSES.filter((c) => counts[c]).map((c) => `${c} ${counts[c]}`).join(" · ") || "none";
}

async function loadTriggers(append) {
  const body = await api("console/api/triggers", { ...filters(), cursor: append ? state.cursor : "" });
  const tbody = $("triggers").tBodies[0];
  if (!append) tbody.replaceChildren();
  for (const { record, traffic } of body.results) {
    const tr = row([
      record.subject, record.trigger_type, record.collection || "",
      record.enabled === false ? "no" : "yes", record.revision, record.updated_at || record.created_at,
      carries(record), recent(traffic),
    ]);
    tr.dataset.subject = record.subject;
    tr.dataset.type = record.trigger_type;
    tr.dataset.name = record.name;
    if (record.enabled === false) tr.cells[3].className = "off";
    if (state.selected === record.subject) tr.classList.add("selected");
    tr.addEventListener("click", () => select(record.trigger_type, record.name, record.subject));
    tbody.append(tr);
  }
  state.cursor = body.next_cursor || null;
  $("more").hidden = !state.cursor;
  $("empty").hidden = tbody.rows.length > 0;
}

async function loadRoutes() {
  const body = await api("console/api/triggers", { type: "gateway", limit: "1000" });
  const tbody = $("routes").querySelector("tbody");
  tbody.replaceChildren();
  for (const { record, traffic } of body.results) {
    const counts = classCounts(traffic);
    tbody.append(row([carries(record), record.name, ...CLASSES.map((c) => counts[c]), mixBar(traffic)]));
  }
  if (!tbody.rows.length) {
    const none = row([el("span", "No gateway trigger.", "muted")]);
    none.cells[0].colSpan = 7;
    tbody.append(none);
  }
}

async function loadDetail() {
  if (!state.selected) return;
  const { type, name } = state.selected;
  const body = await api(`console/api/triggers/${encodeURIComponent(type)}/${encodeURIComponent(name)}`);
  $("detail").hidden = false;
  $("detail-title").textContent = body.record.subject;
  $("record").textContent = JSON.stringify(body.record, null, 2);
  const counters = $("counters");
  counters.replaceChildren();
  if (body.traffic) {
    const counts = classCounts(body.traffic);
    counters.append(el("p", `This sidecar, last ${body.traffic.window_s} s: ` +
      CLASSES.map((c) => `${c} ${counts[c]}`).join(", ")), mixBar(body.traffic));
  }
  if (body.metrics.length) {
    const table = el("table");
    table.append(row([el("b", "metric"), el("b", "labels"), el("b", "value")]));
    for (const sample of body.metrics) {
      const labels = Object.entries(sample.labels).map(([k, v]) => `${k}="${v}"`).join(", ");
      table.append(row([sample.name, labels, sample.value]));
    }
    counters.append(table);
  }
  if (!body.traffic && !body.metrics.length) {
    counters.append(el("p", "No counters for this trigger in this sidecar.", "muted"));
  }
  const history = $("history").tBodies[0];
  history.replaceChildren();
  for (const entry of body.history.results) {
    history.append(row([entry.revision, entry.time, entry.type, entry.record.enabled === false ? "no" : "yes"]));
  }
}

function select(type, name, subject) {
  state.selected = { type, name, subject };
  for (const tr of $("triggers").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.subject === subject);
  refreshDetail();
}

async function refreshDetail() {
  try {
    await loadDetail();
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function refresh() {
  try {
    await Promise.all([loadTriggers(false), loadRoutes(), loadDetail()]);
    setStatus("Refreshed " + new Date().toLocaleTimeString());
  } catch (error) {
    setStatus(error.message, true);
  }
}

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  state.started = true;
  sessionStorage.setItem("trigger-console-token", state.token);
  refresh();
});
$("forget").addEventListener("click", () => {
  state.token = "";
  state.started = false;
  $("token").value = "";
  sessionStorage.removeItem("trigger-console-token");
  setStatus("Token forgotten.");
});
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  refresh();
});
$("more").addEventListener("click", () => loadTriggers(true).catch((error) => setStatus(error.message, true)));
setInterval(() => {
  if ($("auto").checked && !document.hidden && state.started) refresh();
}, REFRESH_MS);
$("token").value = state.token;
if (state.started) refresh();

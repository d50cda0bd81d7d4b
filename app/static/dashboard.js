// The AI Farm dashboard: no build step, no framework. Reads come pushed over one server-sent
// event stream per view (GET /admin/events, read with fetch() so the admin token travels in the
// Authorization header, not in a URL); only actions (pause, resume, stop, disable, submit) call
// the REST API. Routes: #/ overview, #/tasks, #/task/<id>, #/client/<id>, #/submit.
"use strict";

const TOKEN_KEY = "aifarm_token";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const num = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits).replace(/\.?0+$/, ""));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const FINISHED = ["completed", "failed", "error", "stopped"];

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "err" : "muted";
}

// --- sign-in ---

function signedIn() {
  const yes = Boolean(token());
  $("login").hidden = yes;
  $("nav").hidden = !yes;
  $("signout").hidden = !yes;
  return yes;
}

function signedOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  closeStream();
  setStatus(message || "signed out", Boolean(message));
  show();
}

$("signin").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await fetch("/admin/login", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({username: $("user").value, password: $("password").value})});
  const data = await r.json().catch(() => ({}));
  $("password").value = "";
  if (!r.ok) { setStatus(r.status + " " + (data.message || r.statusText), true); return; }
  sessionStorage.setItem(TOKEN_KEY, data.token);
  setStatus("");
  show();
});

$("tokenform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  show();
});

$("signout").addEventListener("click", async () => {
  try { await call("POST", "/admin/logout"); } catch (e) { /* the token is dropped either way */ }
  signedOut();
});

// --- REST, for actions only ---

async function call(method, path, body) {
  const r = await fetch(path, {method, headers: {"Authorization": "Bearer " + token(), "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) { signedOut("please sign in again (" + (data.message || "401") + ")"); }
  return {ok: r.ok, status: r.status, data};
}

async function act(method, path, body, what) {
  const r = await call(method, path, body);
  setStatus(r.ok ? what + ": done" : r.status + " " + (r.data.message || ""), !r.ok);
}

// --- the push channel ---

let streamCtl = null;

function closeStream() {
  if (streamCtl) streamCtl.abort();
  streamCtl = null;
  $("live").textContent = "";
}

function openStream(params, render) {
  closeStream();
  const ctl = new AbortController();
  streamCtl = ctl;
  (async () => {
    while (!ctl.signal.aborted) {
      try {
        const r = await fetch("/admin/events?" + new URLSearchParams({...params, follow: "1"}), {signal: ctl.signal, cache: "no-store",
          headers: {"Authorization": "Bearer " + token(), "Accept": "text/event-stream"}});
        if (r.status === 401) { const d = await r.json().catch(() => ({})); signedOut("please sign in again (" + (d.message || "401") + ")"); return; }
        if (!r.ok) {
          const d = await r.json().catch(() => ({}));
          setStatus(r.status + " " + (d.message || r.statusText), true);
          if (r.status === 400 || r.status === 404) return;
          await sleep(5000);
          continue;
        }
        $("live").textContent = "● live";
        $("live").className = "muted";
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buf += value;
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let event = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) event = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (!data) continue;  // a keepalive comment
            const payload = JSON.parse(data);
            if (event === "signed_out") { signedOut(payload.message); return; }
            if (event === "missing") { setStatus(payload.message, true); return; }
            if (event === "reopen") continue;
            if (payload.unavailable) { setStatus(payload.unavailable, true); continue; }
            render(payload);
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
      }
      $("live").textContent = "○ reconnecting";
      $("live").className = "err";
      await sleep(2000);
    }
  })();
}

// --- views ---

function show() {
  closeStream();
  if ($("status").className !== "err") setStatus("");
  for (const el of document.querySelectorAll(".view")) el.hidden = true;
  if (!signedIn()) return;
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/");
  const params = new URLSearchParams(query || "");
  if (parts[0] === "tasks") {
    $("view-tasks").hidden = false;
    $("f-status").value = params.get("status") || "";
    $("f-type").value = params.get("type") || "";
    const filters = {view: "tasks"};
    if (params.get("status")) filters.status = params.get("status");
    if (params.get("type")) filters.type = params.get("type");
    openStream(filters, (d) => renderTasks(d, params.get("type") || ""));
  } else if (parts[0] === "task" && parts[1]) {
    $("view-task").hidden = false;
    resetChart();
    openStream({view: "task", id: parts[1]}, renderTask);
  } else if (parts[0] === "client" && parts[1]) {
    $("view-client").hidden = false;
    openStream({view: "client", id: decodeURIComponent(parts[1])}, renderClient);
  } else if (parts[0] === "submit") {
    $("view-submit").hidden = false;
  } else {
    $("view-overview").hidden = false;
    openStream({view: "overview"}, renderOverview);
  }
}
window.addEventListener("hashchange", show);

function rows(el, items, emptyText, cols) {
  el.innerHTML = items.length ? items.join("") : `<tr><td colspan="${cols}" class="muted">${esc(emptyText)}</td></tr>`;
}

const kv = (obj) => Object.entries(obj).map(([k, v]) => `<tr><th>${esc(k)}</th><td>${esc(v)}</td></tr>`);

function renderOverview(d) {
  $("ov-connected").textContent = d.connected_clients;
  $("ov-active").textContent = d.active_tasks;
  $("ov-rpm").textContent = d.rounds_per_minute;
  if (d.workers === null) {
    $("ov-workers").textContent = d.mode === "embedded" ? "in-process" : "?";
    $("ov-worker-names").textContent = d.mode === "embedded" ? "embedded mode" : "the broker did not answer";
  } else {
    $("ov-workers").textContent = d.workers.length;
    $("ov-worker-names").textContent = d.workers.join(", ");
  }
  rows($("ov-queues"), Object.entries(d.queues || {}).map(([q, n]) => `<tr><td>${esc(q)}</td><td>${n}</td></tr>`),
    d.mode === "embedded" ? "no broker (embedded mode)" : "the broker did not answer", 2);
  rows($("ov-tasks"), kv(d.tasks), "no tasks", 2);
  rows($("ov-clients"), kv(d.clients), "no clients", 2);
  rows($("ov-errors"), d.recent_errors.map((e) => `<tr><td>${when(e.at)}</td><td><a href="#/task/${e.task_id}">${e.task_id}</a></td>
    <td>${e.round ?? ""}</td><td>${e.client_id ? `<a href="#/client/${encodeURIComponent(e.client_id)}">${esc(e.client_id)}</a>` : ""}</td>
    <td>${esc(e.what)}</td><td class="muted">${esc(e.message)}</td></tr>`), "none", 6);
  rows($("ov-client-list"), d.client_list.map((c) => `<tr><td><a href="#/client/${encodeURIComponent(c.id)}">${esc(c.id)}</a></td>
    <td>${esc(c.status)}${c.disabled ? " (disabled)" : ""}</td><td>${c.connected ? "yes" : "no"}</td>
    <td>${c.cores} cores, ${num(c.ram_gb, 1)} GB, ${c.gpus} GPU</td>
    <td>${c.utilization ? num(c.utilization.cpu_utilization, 1) + "% / " + num(c.utilization.ram_utilization, 1) + "%" : "–"}</td>
    <td>${when(c.last_seen)}</td></tr>`), "no clients yet", 6);
}

function progressText(t) {
  if (t.rounds_total === null || t.rounds_total === undefined) return t.finished ? "finished" : "";
  if (t.finished) return `${t.rounds_done} / ${t.rounds_total} rounds done`;
  return `round ${t.training_round} / ${t.rounds_total} (${t.rounds_done} done)`;
}

function renderTasks(d, typeFilter) {
  const sel = $("f-type");
  const options = `<option value="">any</option>` + d.types.map((t) => `<option>${esc(t)}</option>`).join("");
  if (sel.dataset.options !== options) {  // rebuilt only when the types change (an open list stays open)
    sel.innerHTML = options;
    sel.dataset.options = options;
    sel.value = typeFilter;
  }
  rows($("task-rows"), d.items.map((t) => `<tr><td><a href="#/task/${t.id}">${t.id}</a></td><td>${esc(t.type)}</td>
    <td><span class="badge ${esc(t.status)}">${esc(t.status)}</span></td><td>${esc(progressText(t))}</td>
    <td>${num(t.last_accuracy)}</td><td>${t.num_shards}</td><td class="muted">${esc(t.status_reason || "")}</td>
    <td>${when(t.updated_at)}</td></tr>`), "no tasks match", 8);
}

for (const id of ["f-status", "f-type"]) {
  $(id).addEventListener("change", () => {
    const q = new URLSearchParams();
    if ($("f-status").value) q.set("status", $("f-status").value);
    if ($("f-type").value) q.set("type", $("f-type").value);
    location.hash = "#/tasks" + (q.toString() ? "?" + q : "");
  });
}

// The chart: loss (left axis) and accuracy (right axis, 0..1) per finished round.
let chart = null;
function resetChart() {
  if (chart) chart.destroy();
  chart = null;
  $("chart").innerHTML = "";
  $("chart").dataset.points = "0";
}

function drawChart(done) {
  const data = [done.map((r) => r.round + 1), done.map((r) => r.train_loss), done.map((r) => r.test_loss),
    done.map((r) => r.test_accuracy)];
  if (!chart) {
    const el = $("chart");
    chart = new uPlot({
      width: Math.max(400, Math.min(el.clientWidth || 800, 900)), height: 280,
      scales: {x: {time: false}, acc: {range: [0, 1]}},
      series: [
        {label: "round"},
        {label: "train loss", scale: "loss", stroke: "#d62728", width: 2, points: {show: true}},
        {label: "test loss", scale: "loss", stroke: "#ff7f0e", width: 2, dash: [5, 4], points: {show: true}},
        {label: "test accuracy", scale: "acc", stroke: "#1f77b4", width: 2, points: {show: true}},
      ],
      axes: [{label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]}, {scale: "loss", label: "loss"},
        {scale: "acc", side: 1, label: "accuracy", grid: {show: false}}],
    }, data, el);
  } else {
    chart.setData(data);
  }
  $("chart").dataset.points = String(done.length);
}

function renderTask(t) {
  $("t-title").textContent = `Task ${t.id} · ${t.type}`;
  $("t-status").textContent = t.status;
  $("t-status").className = "badge " + t.status;
  $("t-progress").textContent = progressText(t);
  $("t-reason").textContent = t.status_reason || "";
  const buttons = [];
  if (t.status === "running" || t.status === "pending") buttons.push(["pause", "paused"]);
  if (t.status === "paused") buttons.push(["resume", "running"]);
  if (!FINISHED.includes(t.status)) buttons.push(["stop", "stopped"]);
  $("t-actions").innerHTML = buttons.map(([label, target]) => `<button data-target="${target}">${label}</button>`).join("");
  for (const b of $("t-actions").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      if (b.dataset.target === "stopped" && !confirm(`stop task ${t.id} for good?`)) return;
      act("PUT", `/api/tasks/${t.id}/status`, {status: b.dataset.target}, `task ${t.id} ${b.textContent}`);
    });
  }
  const done = t.rounds.filter((r) => r.status === "done");
  if (t.type === "federated_training") drawChart(done);
  rows($("t-rounds"), t.rounds.map((r) => `<tr><td>${r.round + 1}</td><td>${esc(r.status)}</td><td>${num(r.train_loss)}</td>
    <td>${num(r.test_loss)}</td><td>${num(r.test_accuracy)}</td><td>${r.updates ?? "–"}</td><td>${num(r.seconds, 2)}</td>
    <td>${when(r.finished_at)}</td></tr>`), "no round yet", 8);
  $("t-shards-title").textContent = t.rounds_total ? `Shards of round ${t.current_round + 1}` : "Shards";
  rows($("t-shards"), t.shards.map((s) => `<tr><td>${s.rank}</td><td>${esc(s.state)}</td>
    <td>${s.holder ? `<a href="#/client/${encodeURIComponent(s.holder)}">${esc(s.holder)}</a>` : "–"}</td>
    <td>${esc(s.assignment || "–")}</td><td>${s.progress === null ? "–" : num(s.progress, 1) + "%"}</td>
    <td>${when(s.deadline_at)}</td><td>${s.attempts}</td></tr>`), "no shards", 7);
  $("t-config").textContent = JSON.stringify(t.config, null, 2);
  $("t-error").hidden = !t.error_log;
  $("t-error").textContent = t.error_log || "";
}

function renderClient(c) {
  $("c-title").textContent = "Client " + c.id;
  $("c-status").textContent = c.status + (c.disabled ? " (disabled)" : "");
  $("c-conn").textContent = c.connected ? "connected" : "not connected";
  $("c-actions").innerHTML = `<button>${c.disabled ? "enable" : "disable"}</button>`;
  $("c-actions").querySelector("button").addEventListener("click", () =>
    act("PUT", `/api/clients/${encodeURIComponent(c.id)}/status`, {status: c.disabled ? "enabled" : "disabled"}, "client " + c.id));
  const gpus = (c.gpu_info || []).map((g, i) => `GPU ${i}: ${esc(g.name || "")} ${esc(g.memory_gb ?? "")} GB`).join("; ");
  rows($("c-hardware"), kv({"CPU cores": c.cpu_info.cores ?? "", CPU: c.cpu_info.model || c.cpu_info.name || "",
    "RAM GB": c.ram_info.total_gb ?? "", GPUs: gpus || "none", "task types": (c.task_types || []).join(", ") || "any",
    "first seen": when(c.created_at), "last seen": when(c.last_seen)}), "", 2);
  const u = c.utilization;
  rows($("c-util"), u ? kv({"CPU %": num(u.cpu_utilization, 1), "RAM %": num(u.ram_utilization, 1),
    GPU: (u.gpu_utilization || []).map((g) => `#${g.id}: ${num(g.utilization, 1)}%`).join(", ") || "–", reported: when(u.reported_at)}) : [],
    "nothing reported yet", 2);
  const rel = c.reliability;
  rows($("c-rel"), kv({"valid results": rel.valid_results, errors: rel.error_results, "timed out": rel.timeouts,
    "refused updates": rel.refused_updates, "mean turnaround s": num(rel.mean_turnaround_s, 2),
    "throughput (examples/s)": num(rel.throughput, 1), score: num(rel.score, 3), "task quota": rel.task_quota}), "", 2);
  rows($("c-history"), c.history.map((a) => `<tr><td><a href="#/task/${a.task_id}">${a.task_id}</a></td><td>${a.round + 1}</td>
    <td>${a.rank}</td><td>${esc(a.status)}</td><td>${a.progress === null ? "–" : num(a.progress, 1) + "%"}</td>
    <td>${when(a.assigned_at)}</td><td>${when(a.updated_at)}</td><td class="muted">${esc(a.error || "")}</td></tr>`), "no work yet", 8);
}

// --- submit ---

function parseValue(raw) {  // numbers as numbers; anything else as typed, for the server to judge
  const s = raw.trim();
  if (/^-?\d+$/.test(s)) return parseInt(s, 10);
  if (s !== "" && !Number.isNaN(Number(s))) return Number(s);
  return s;
}

function fieldOf(data) {  // the form field a refusal names: its "field", or the message's first word
  if (data.field) return String(data.field).replace(/^body\./, "");
  const m = /^(config\.[A-Za-z_]+|config|type|priority|requirements)\b/.exec(data.message || "");
  return m ? m[1] : null;
}

function clearErrors() {
  for (const el of document.querySelectorAll("#submit .ferr")) el.textContent = "";
  for (const el of document.querySelectorAll("#submit .field.bad")) el.classList.remove("bad");
  $("s-form-error").textContent = "";
}

$("submit").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearErrors();
  const body = {type: $("s-type").value.trim(), priority: parseValue($("s-priority").value), config: {}};
  for (const el of document.querySelectorAll("#submit fieldset [data-field^='config.']")) {
    if (el.value.trim() !== "") body.config[el.dataset.field.slice(7)] = el.tagName === "SELECT" ? el.value : parseValue(el.value);
  }
  for (const [id, key] of [["s-extra", "config"], ["s-req", "requirements"]]) {
    const text = $(id).value.trim();
    if (!text) continue;
    let parsed;
    try { parsed = JSON.parse(text); } catch (e) { showFieldError(key, "not JSON: " + e.message); return; }
    if (key === "config") body.config = {...parsed, ...body.config};
    else body.requirements = parsed;
  }
  const r = await call("POST", "/api/tasks", body);
  if (r.ok) { setStatus(`task ${r.data.id} submitted`); location.hash = "#/task/" + r.data.id; return; }
  const field = fieldOf(r.data);
  showFieldError(field, r.status + " " + (r.data.message || ""));
});

function showFieldError(field, message) {
  const slot = field && document.querySelector(`#submit .ferr[data-for="${CSS.escape(field)}"]`);
  const target = slot || (field && field.startsWith("config.") && document.querySelector('#submit .ferr[data-for="config"]'));
  if (target) {
    target.textContent = message;
    target.closest(".field").classList.add("bad");
  } else {
    $("s-form-error").textContent = message;
  }
}

show();

// ainode dashboard: plain JavaScript, no dependencies, every asset served by the node.
// Values from DICOM (descriptions, UIDs, errors) only ever go into textContent.
"use strict";

const POLL_MS = 3000;
const STATES = ["queued", "running", "done", "failed", "skipped", "cancelled"];
let csrf = "";
let timer = null;

// --- helpers ------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function when(iso) {
  if (!iso) return "";
  return new Date(iso.endsWith("Z") ? iso : iso + "Z").toLocaleString();
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function badge(state) {
  const label = { ok: "alive", bad: "gone" }[state] || state;
  return h("span", { class: "badge s-" + state, "data-state": state }, label);
}

function table(headers, rows, attrs) {
  return h("table", attrs || {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
           h("tbody", {}, rows));
}

async function api(path, options) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
  if (opts.method === "POST") {
    opts.headers["X-CSRF-Token"] = csrf;
    opts.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, opts);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : resp.statusText);
  return body;
}

function flash(message, bad) {
  const el = document.getElementById("flash");
  el.textContent = message;
  el.className = bad ? "bad" : "";
  el.hidden = false;
  setTimeout(() => { el.hidden = true; }, 6000);
}

async function act(path, body, done) {
  try {
    const r = await api(path, { method: "POST", body: JSON.stringify(body || {}) });
    flash(r.message, !r.ok);
  } catch (e) {
    flash(e.message, true);
  }
  if (done) await done();
}

function live(ok) {
  document.getElementById("live").classList.toggle("stale", !ok);
}

// Re-run ``refresh`` every POLL_MS until the route changes.
function poll(refresh) {
  const tick = async () => {
    try { await refresh(); live(true); } catch (e) { live(false); }
  };
  tick();
  timer = setInterval(tick, POLL_MS);
}

// --- views --------------------------------------------------------------------

function overview(view) {
  const box = h("div", { id: "overview" });
  view.replaceChildren(box);
  poll(async () => {
    const [o, audit] = await Promise.all([api("/api/summary"), api("/api/audit?limit=10")]);
    const s = o.summary;
    const cards = STATES.map((st) => h("a", { class: "card", href: "#/jobs?status=" + st, "data-count": st },
      h("div", { class: "n" }, s.jobs_by_status[st] || 0), h("div", { class: "l" }, st + " jobs")));
    cards.push(
      h("div", { class: "card" }, h("div", { class: "n" }, s.studies_last_hour + " / " + s.studies_last_day),
        h("div", { class: "l" }, "studies received (hour / day)")),
      h("div", { class: "card" }, h("div", { class: "n" }, s.results_sent_last_hour + " / " + s.results_sent_last_day),
        h("div", { class: "l" }, "results sent (hour / day)")),
      h("a", { class: "card", href: "#/studies?quarantined=true", "data-count": "quarantined" },
        h("div", { class: "n" }, s.studies_quarantined || 0), h("div", { class: "l" }, "quarantined studies")),
      h("div", { class: "card" }, h("div", { class: "n" }, age(s.oldest_queued_age_seconds)),
        h("div", { class: "l" }, s.oldest_queued_job_id
          ? h("a", { href: "#/jobs/" + s.oldest_queued_job_id }, "oldest waiting job #" + s.oldest_queued_job_id)
          : "oldest waiting job")));
    const workers = table(["worker", "device", "state", "job", "last seen"], s.workers.map((w) => h("tr", {},
      h("td", {}, w.owner), h("td", {}, w.device), h("td", {}, w.alive ? badge("ok") : badge("bad")),
      h("td", {}, w.job_id ? h("a", { href: "#/jobs/" + w.job_id }, "#" + w.job_id) : "idle"),
      h("td", {}, when(w.seen_at)))));
    const dests = table(["destination", "pending", "sent", "failed", "last C-ECHO", ""], o.destinations.map((d) => h("tr", {},
      h("td", {}, d.name), h("td", {}, d.pending), h("td", {}, d.sent), h("td", {}, d.failed),
      h("td", {}, d.last_echo_at ? [d.last_echo_ok ? "ok" : "failed", " " + when(d.last_echo_at)] : "never"),
      h("td", {}, h("button", { class: "secondary", onclick: () => act("/api/destinations/" + encodeURIComponent(d.name) + "/echo") }, "C-ECHO")))));
    box.replaceChildren(
      h("h2", {}, "Queue"), h("div", { class: "cards" }, cards),
      h("div", { class: "grid2" },
        h("section", {}, h("h2", {}, "Workers"), s.workers.length ? workers : h("p", { class: "muted" }, "no worker has reported in")),
        h("section", {}, h("h2", {}, "Destinations"), dests)),
      h("h2", {}, "Recent admin actions"), auditTable(audit));
  });
}

function auditTable(rows) {
  return table(["when", "who", "action", "target", "detail"], rows.map((a) => h("tr", {},
    h("td", {}, when(a.at)), h("td", {}, a.actor), h("td", {}, a.action), h("td", {}, a.target), h("td", {}, a.detail))),
    { id: "audit" });
}

function jobs(view, params) {
  const field = (name, label, input) => h("label", {}, label, input);
  const val = (name) => params.get(name) || "";
  const status = h("select", { name: "status" }, h("option", { value: "" }, "any"),
    STATES.map((st) => h("option", { value: st, selected: val("status") === st }, st)));
  const form = h("form", { class: "filters", id: "job-filters" },
    field("status", "state", status),
    field("model", "model", h("input", { name: "model", value: val("model"), size: 12 })),
    field("modality", "modality", h("input", { name: "modality", value: val("modality"), size: 5 })),
    field("from", "from", h("input", { name: "from", type: "date", value: val("from") })),
    field("to", "to", h("input", { name: "to", type: "date", value: val("to") })),
    field("q", "UID or accession", h("input", { name: "q", value: val("q"), size: 28 })),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) next.set(k, v);
    location.hash = "#/jobs?" + next.toString();
  });
  const box = h("div", { id: "jobs" });
  view.replaceChildren(h("h2", {}, "Jobs"), form, box);
  const query = new URLSearchParams(params);
  if (query.get("to")) query.set("to", query.get("to") + "T23:59:59");
  const page = Number(params.get("page") || 1);
  poll(async () => {
    const r = await api("/api/jobs?" + query.toString());
    const rows = r.items.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("a", { href: "#/jobs/" + j.id }, "#" + j.id)), h("td", {}, badge(j.status)),
      h("td", {}, j.model), h("td", {}, j.modality), h("td", {}, j.series_description),
      h("td", { class: "uid" }, j.study_uid), h("td", {}, j.accession_number || ""),
      h("td", {}, when(j.created_at)), h("td", {}, j.inference_seconds === null ? "" : j.inference_seconds.toFixed(2) + " s"),
      h("td", {}, j.attempts + "/" + j.max_attempts)));
    const pages = Math.max(1, Math.ceil(r.total / r.per_page));
    const go = (p) => { const n = new URLSearchParams(params); n.set("page", p); location.hash = "#/jobs?" + n.toString(); };
    box.replaceChildren(
      table(["job", "state", "model", "modality", "series", "study UID", "accession", "queued", "inference", "attempts"], rows, { id: "job-table" }),
      h("div", { class: "pager" },
        h("button", { class: "secondary", disabled: page <= 1, onclick: () => go(page - 1) }, "previous"),
        h("span", {}, `page ${page} of ${pages} (${r.total} jobs)`),
        h("button", { class: "secondary", disabled: page >= pages, onclick: () => go(page + 1) }, "next")));
  });
}

function jobPage(view, id) {
  const box = h("div", { id: "job" });
  view.replaceChildren(box);
  const dests = [];
  api("/api/destinations").then((ds) => ds.forEach((d) => dests.push(d.name))).catch(() => {});
  const refresh = async () => {
    const d = await api("/api/jobs/" + id);
    const j = d.job;
    const pick = h("select", { id: "resend-destination" }, dests.map((n) => h("option", { value: n }, n)));
    const actions = h("div", { class: "actions" },
      h("button", { id: "retry", disabled: !["failed", "cancelled", "skipped"].includes(j.status),
        onclick: () => act(`/api/jobs/${id}/retry`, {}, refresh) }, "Retry"),
      h("button", { id: "cancel", class: "danger", disabled: !["queued", "running"].includes(j.status),
        onclick: () => act(`/api/jobs/${id}/cancel`, {}, refresh) }, "Cancel"),
      pick,
      h("button", { id: "resend", class: "secondary", disabled: j.status !== "done" || !d.results.length,
        onclick: () => act(`/api/jobs/${id}/resend`, { destination: pick.value }, refresh) }, "Re-send"));
    const seen = new Set();
    const downloads = d.results.filter((r) => !seen.has(r.sop_instance_uid) && seen.add(r.sop_instance_uid))
      .map((r) => h("li", {}, h("a", { href: `/api/results/${r.id}/file`, download: true }, `${r.kind} ${r.sop_instance_uid}`)));
    box.replaceChildren(
      h("h2", {}, `Job #${j.id} `, badge(j.status)),
      actions,
      h("dl", { class: "kv" },
        h("dt", {}, "model"), h("dd", {}, j.model), h("dt", {}, "route"), h("dd", {}, j.route),
        h("dt", {}, "series"), h("dd", {}, `${j.modality} ${j.series_description}`),
        h("dt", {}, "study UID"), h("dd", {}, j.study_uid), h("dt", {}, "series UID"), h("dd", {}, j.series_uid),
        h("dt", {}, "accession"), h("dd", {}, j.accession_number || ""),
        h("dt", {}, "attempts"), h("dd", {}, `${j.attempts} of ${j.max_attempts}`),
        h("dt", {}, "inference time"), h("dd", {}, j.inference_seconds === null ? "" : j.inference_seconds.toFixed(2) + " s"),
        h("dt", {}, "destinations"), h("dd", {}, j.destinations.join(", "))),
      j.last_error ? h("pre", { class: "error", id: "job-error" }, j.last_error) : "",
      h("h2", {}, "Timeline"),
      h("ol", { class: "timeline", id: "timeline" }, d.timeline.map((e) => h("li", { "data-event": e.event },
        h("strong", {}, e.event), h("span", { class: "t" }, when(e.at)), e.detail ? h("div", { class: "muted" }, e.detail) : ""))),
      h("h2", {}, "Results"),
      table(["object", "destination", "state", "attempts", "sent", "error"], d.results.map((r) => h("tr", {},
        h("td", {}, r.kind), h("td", {}, r.destination), h("td", {}, badge(r.status)), h("td", {}, r.attempts),
        h("td", {}, when(r.sent_at)), h("td", {}, r.last_error || "")))),
      ...(downloads.length ? [h("h2", {}, "Downloads"), h("ul", { id: "downloads" }, downloads)] : []));
  };
  poll(refresh);
}

// A quarantined study (its jobs could not be planned): the reason, as text, and its actions.
function quarantine(s, refresh) {
  if (!s.quarantined_at) return "";
  const remove = () => {
    if (confirm(`Delete study #${s.id} (${s.study_uid}) with its instances and results?`))
      return act(`/api/studies/${s.id}/delete`, {}, refresh);
  };
  return h("div", { class: "quarantine" },
    h("span", { class: "badge s-failed", "data-state": "quarantined" }, "quarantined"), " ", when(s.quarantined_at),
    h("pre", { class: "error quarantine-reason" }, s.quarantine_reason || ""),
    h("div", { class: "actions" },
      h("button", { class: "study-retry", onclick: () => act(`/api/studies/${s.id}/retry`, {}, refresh) }, "Retry"),
      h("button", { class: "study-delete danger", onclick: remove }, "Delete")));
}

function studies(view, params) {
  const q = h("input", { name: "q", value: params.get("q") || "", size: 40, placeholder: "study UID or accession" });
  const only = h("input", { type: "checkbox", name: "quarantined", checked: params.get("quarantined") === "true" });
  const form = h("form", { class: "filters" }, q, h("label", {}, "quarantined only", only),
    h("button", { type: "submit" }, "Search"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    if (q.value) next.set("q", q.value);
    if (only.checked) next.set("quarantined", "true");
    location.hash = "#/studies?" + next.toString();
  });
  const box = h("div", {});
  view.replaceChildren(h("h2", {}, "Studies"), form, box);
  const refresh = async () => {
    const r = await api("/api/studies?" + new URLSearchParams(params).toString());
    box.replaceChildren(table(["study UID", "accession", "received", "complete", "jobs", "series (instances)", "quarantine"],
      r.items.map((s) => h("tr", { "data-study": s.id }, h("td", { class: "uid" }, s.study_uid), h("td", {}, s.accession_number || ""),
        h("td", {}, when(s.last_received_at)), h("td", {}, when(s.completed_at)),
        h("td", {}, h("a", { href: "#/jobs?q=" + encodeURIComponent(s.study_uid) }, s.jobs)),
        h("td", {}, h("ul", {}, s.series.map((se) => h("li", {}, `${se.modality} ${se.series_description} (${se.instance_count})`)))),
        h("td", {}, quarantine(s, refresh)))), { id: "study-table" }));
  };
  poll(refresh);
}

function models(view) {
  const box = h("div", {});
  view.replaceChildren(h("h2", {}, "Models"), box);
  poll(async () => {
    const r = await api("/api/models");
    box.replaceChildren(table(["model", "version", "weights SHA-256", "accepts", "device", "jobs", "done", "failed", "avg inference"],
      r.map((m) => h("tr", {}, h("td", {}, m.info.name), h("td", {}, m.info.algorithm_version),
        h("td", { class: "uid" }, m.info.weights_sha256 || "none"), h("td", {}, m.info.modalities.join(", ")),
        h("td", {}, m.devices.join(", ")), h("td", {}, m.stats ? m.stats.jobs : 0), h("td", {}, m.stats ? m.stats.done : 0),
        h("td", {}, m.stats ? m.stats.failed : 0),
        h("td", {}, m.stats && m.stats.average_inference_seconds !== null ? m.stats.average_inference_seconds.toFixed(2) + " s" : "")))));
  });
}

function audit(view) {
  const box = h("div", {});
  view.replaceChildren(h("h2", {}, "Audit log"), box);
  poll(async () => box.replaceChildren(auditTable(await api("/api/audit?limit=200"))));
}

// --- router -------------------------------------------------------------------

function route() {
  if (timer) clearInterval(timer);
  timer = null;
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const view = document.getElementById("view");
  const parts = path.split("/").filter(Boolean);
  const section = parts[0] || "overview";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
  if (section === "jobs" && parts[1]) jobPage(view, Number(parts[1]));
  else if (section === "jobs") jobs(view, params);
  else if (section === "studies") studies(view, params);
  else if (section === "models") models(view);
  else if (section === "audit") audit(view);
  else overview(view);
}

async function start() {
  try {
    const s = await api("/api/session");
    csrf = s.csrf_token;
    document.getElementById("who").textContent = s.actor;
  } catch (e) {
    flash("cannot reach the node: " + e.message, true);
  }
  window.addEventListener("hashchange", route);
  route();
}

start();

// Alerts page: the list with filters (site, state, severity), each alert's history on demand,
// acknowledge and clear with a note (roles that may; through api.js, which adds the CSRF header),
// and the contacts notified per site. Re-read every 15 s while nothing is being edited.
// Everything from the hub is set with textContent: messages and names are data, never markup.

import { api } from "/static/api.js";
import { el } from "/static/dom.js";

const info = JSON.parse(document.getElementById("alerts-data").textContent);
const listEl = document.getElementById("alerts");
const shownEl = document.getElementById("shown");
const messageEl = document.getElementById("message");
const siteEl = document.getElementById("f-site");
const stateEl = document.getElementById("f-state");
const severityEl = document.getElementById("f-severity");
const REFRESH_MS = 15000;
let editing = 0; // action forms open: no re-render under the user's hands

function timeText(value) {
  return value ? value.replace("T", " ").slice(0, 19) + " UTC" : "";
}

function say(text, kind = "ok") {
  messageEl.textContent = text;
  messageEl.dataset.kind = kind;
  messageEl.className = kind === "error" ? "error" : "live";
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `HTTP ${response.status}`;
  }
}

function query() {
  const params = new URLSearchParams({ limit: "200" });
  if (siteEl.value) params.append("site", siteEl.value);
  if (stateEl.value === "active") { params.append("state", "open"); params.append("state", "acknowledged"); }
  else if (stateEl.value) params.append("state", stateEl.value);
  if (severityEl.value) params.append("severity", severityEl.value);
  return params.toString();
}

async function showHistory(alert, box) {
  const response = await api(`/api/v1/alerts/${alert.id}`);
  if (!response.ok) { box.replaceChildren(el("p", { class: "error", text: await detail(response) })); return; }
  const full = await response.json();
  box.replaceChildren(el("ol", { class: "history", "data-history": String(alert.id) }, ...full.history.map((h) =>
    el("li", { "data-action": h.action },
      el("time", { datetime: h.ts || "", text: timeText(h.ts) }), " ",
      el("strong", { text: h.action }), h.by ? ` by ${h.by}` : "",
      h.value !== null && h.value !== undefined ? ` (value ${h.value})` : "",
      h.message ? ` — ${h.message}` : ""))));
}

function actionForm(alert, action, cell, historyBox) {
  const verb = action === "ack" ? "Acknowledge" : "Clear";
  const id = `note-${action}-${alert.id}`;
  const note = el("input", { id, type: "text", maxlength: "2000", autocomplete: "off" });
  const form = el("form", { class: "act-form", "data-form": `${action}-${alert.id}` },
    el("label", { for: id, text: `Note (optional) for ${verb.toLowerCase()} of alert ${alert.id}` }), note,
    el("button", { type: "submit", text: `${verb} alert ${alert.id}` }),
    el("button", { type: "button", class: "secondary", "data-cancel": "", text: "Cancel" }));
  form.querySelector("[data-cancel]").addEventListener("click", () => { form.remove(); editing -= 1; });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const response = await api(`/api/v1/alerts/${alert.id}/${action}`, { method: "POST",
      body: { by: info.user, note: note.value.trim() } });
    if (!response.ok) { say(`Alert ${alert.id} could not be ${action === "ack" ? "acknowledged" : "cleared"}: ` +
      `${await detail(response)}`, "error"); return; }
    form.remove();
    editing -= 1;
    say(`Alert ${alert.id} ${action === "ack" ? "acknowledged" : "cleared"} by ${info.user}.`);
    await load();
    // Show the new history step right away.
    const details = listEl.querySelector(`details[data-alert="${alert.id}"]`);
    if (details) details.open = true;
  });
  editing += 1;
  cell.append(form);
  note.focus();
}

function row(alert) {
  const historyBox = el("div", { class: "history-box" });
  const details = el("details", { "data-alert": String(alert.id) }, el("summary", { text: `History of alert ${alert.id}` }),
    historyBox);
  details.addEventListener("toggle", () => { if (details.open) showHistory(alert, historyBox); });
  const actions = el("td", { class: "actions" });
  if (info.can_act) {
    if (alert.state === "open") {
      const ack = el("button", { type: "button", "data-action": "ack", text: "Acknowledge" });
      ack.addEventListener("click", () => { if (!actions.querySelector("form")) actionForm(alert, "ack", actions, historyBox); });
      actions.append(ack, " ");
    }
    if (alert.state !== "cleared") {
      const clear = el("button", { type: "button", "data-action": "clear", text: "Clear" });
      clear.addEventListener("click", () => { if (!actions.querySelector("form")) actionForm(alert, "clear", actions, historyBox); });
      actions.append(clear);
    }
  }
  const who = alert.state === "cleared" ? `cleared by ${alert.cleared_by} ${timeText(alert.cleared_at)}`
    : alert.state === "acknowledged" ? `acknowledged by ${alert.acknowledged_by} ${timeText(alert.acknowledged_at)}` : "";
  const where = alert.device
    ? el("a", { href: `/devices/${encodeURIComponent(alert.device)}`, text: alert.device })
    : (alert.gateway ? `${alert.site}.${alert.gateway}` : alert.site || "hub");
  return el("tr", { "data-alert-row": String(alert.id), "data-state": alert.state },
    el("td", {}, el("span", { class: `sev sev-${alert.severity}`, text: alert.severity })),
    el("td", { "data-cell": "state" }, el("span", { text: alert.state }), who ? el("br") : "",
      who ? el("span", { class: "quiet", text: who }) : ""),
    el("th", { scope: "row" }, el("span", { text: alert.message }), el("br"), el("span", { class: "quiet" }, where,
      ` · ${alert.rule} · #${alert.id}`), details),
    el("td", { text: timeText(alert.opened_at) }),
    el("td", { class: "num", text: String(alert.count) }),
    actions);
}

async function load() {
  const response = await api(`/api/v1/alerts?${query()}`);
  if (!response.ok) { say(`The alerts could not be loaded: ${await detail(response)}`, "error"); return; }
  const alerts = await response.json();
  const open = new Set([...listEl.querySelectorAll("details[open]")].map((d) => d.dataset.alert));
  const headers = ["Severity", "State", "Alert", "Opened", "Count", info.can_act ? "Actions" : ""];
  const table = el("table", {},
    el("caption", { class: "visually-hidden", text: "Alerts, newest first" }),
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...(alerts.length ? alerts.map(row)
      : [el("tr", {}, el("td", { colspan: "6", text: "No alerts match." }))])));
  listEl.replaceChildren(el("div", { class: "scroll" }, table));
  for (const d of listEl.querySelectorAll("details")) if (open.has(d.dataset.alert)) d.open = true;
  shownEl.textContent = `Showing ${alerts.length} ${alerts.length === 1 ? "alert" : "alerts"}${alerts.length === 200 ? " (the newest 200)" : ""}.`;
}

async function loadContacts() {
  const box = document.getElementById("contacts");
  const response = await api("/api/v1/alerts/contacts");
  if (!response.ok) { box.replaceChildren(el("p", { class: "error", text: await detail(response) })); return; }
  const contacts = await response.json();
  if (!contacts.length) {
    box.replaceChildren(el("p", { text: "No contacts are configured: alerts are kept here but nobody is notified." }));
    return;
  }
  const perSite = info.sites.map((site) => {
    const who = contacts.filter((c) => !c.sites.length || c.sites.includes(site));
    return el("li", { "data-site": site }, el("strong", { text: site }), ": ",
      who.length ? who.map((c) => `${c.name} (${c.min_severity} and above)`).join(", ") : "nobody");
  });
  const rows = contacts.map((c) => el("tr", { "data-contact": c.name },
    el("th", { scope: "row", text: c.name }), el("td", { text: c.role }),
    el("td", { text: c.sites.length ? c.sites.join(", ") : "every site" }),
    el("td", { text: `${c.min_severity} and above` }),
    el("td", { text: [...c.email, ...(c.webhook_host ? [`webhook to ${c.webhook_host}`] : [])].join(", ") })));
  box.replaceChildren(
    el("ul", { class: "per-site" }, ...perSite),
    el("div", { class: "scroll" }, el("table", {},
      el("caption", { class: "visually-hidden", text: "Notification contacts" }),
      el("thead", {}, el("tr", {}, ...["Contact", "Role", "Sites", "Hears of", "Reached by"].map(
        (h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...rows))));
}

for (const f of [siteEl, stateEl, severityEl]) f.addEventListener("change", load);
document.getElementById("alert-filters").addEventListener("submit", (e) => e.preventDefault());

async function poll() {
  if (!document.hidden && editing === 0) {
    try { await load(); } catch { /* the next poll tries again */ }
  }
  setTimeout(poll, REFRESH_MS);
}
load();
loadContacts();
setTimeout(poll, REFRESH_MS);

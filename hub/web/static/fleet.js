// Fleet page: renders the fleet summary embedded in the page, then every summary the hub sends
// on /api/v1/stream/fleet (server-sent events). Search and status filter work on the client.
// Everything is built with textContent: names from gateways are data, never markup.

import { el } from "/static/dom.js";

const SEVERITIES = ["critical", "warning", "info"];
const STATUSES = ["online", "stale", "offline"];
// The status is always written out; the symbol and colour only repeat it.
const SYMBOL = { online: "●", stale: "◐", offline: "○" };

let summary = JSON.parse(document.getElementById("fleet-data").textContent);
const sitesEl = document.getElementById("sites");
const totalsEl = document.getElementById("totals");
const searchEl = document.getElementById("search");
const statusEl = document.getElementById("status-filter");
const shownEl = document.getElementById("shown");
const liveEl = document.getElementById("live-state");

function badge(status) {
  return el("span", { class: `status status-${status}`, "data-status": status },
    el("span", { "aria-hidden": "true", text: SYMBOL[status] + " " }), status);
}

function countsText(counts) {
  return STATUSES.map((s) => `${counts[s]} ${s}`).join(", ");
}

function alertsText(alerts) {
  const total = SEVERITIES.reduce((n, s) => n + alerts[s], 0);
  if (total === 0) return "none";
  return SEVERITIES.filter((s) => alerts[s] > 0).map((s) => `${alerts[s]} ${s}`).join(", ");
}

function alertsCell(alerts) {
  const td = el("td", { class: "alerts" });
  const total = SEVERITIES.reduce((n, s) => n + alerts[s], 0);
  if (total === 0) td.append(el("span", { class: "quiet", text: "none" }));
  for (const s of SEVERITIES) {
    if (alerts[s] > 0) td.append(el("span", { class: `sev sev-${s}`, text: `${alerts[s]} ${s}` }), " ");
  }
  return td;
}

function timeText(ms) {
  if (ms === null || ms === undefined) return "never";
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function renderTotals() {
  const t = summary.totals;
  totalsEl.replaceChildren();
  const items = [];
  for (const s of STATUSES) items.push([`Devices ${s}`, t.devices[s], `devices-${s}`]);
  for (const s of SEVERITIES) items.push([`Open alerts ${s}`, t.alerts[s], `alerts-${s}`]);
  items.push(["Gateway backlog", t.backlog, "backlog"]);
  for (const [label, value, key] of items) {
    totalsEl.append(el("div", { class: `total total-${key}` },
      el("dt", { text: label }), el("dd", { "data-count": key, text: String(value) })));
  }
}

function matches(words, ...fields) {
  const text = fields.join(" ").toLowerCase();
  return words.every((w) => text.includes(w));
}

function render() {
  const words = searchEl.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const wanted = statusEl.value;
  let shown = 0;
  let all = 0;
  sitesEl.replaceChildren();
  for (const site of summary.sites) {
    const siteEl = el("section", { class: "site", "aria-labelledby": `site-${site.name}`, "data-site": site.name },
      el("h2", { id: `site-${site.name}`, text: `Site ${site.name}` }),
      el("p", { class: "report-links" }, el("a", { href: `/api/v1/sites/${encodeURIComponent(site.name)}/report.pdf`, "data-report": "pdf", text: `Board report (PDF) for ${site.name}` }), " ", el("a", { href: `/api/v1/sites/${encodeURIComponent(site.name)}/report.png`, "data-report": "png", text: "Board report (PNG)" })),
      el("p", { class: "summary", text: `Devices: ${countsText(site.devices)}. Open alerts: ${alertsText(site.alerts)}. ` +
        `Backlog: ${site.backlog}.` }));
    let siteShown = 0;
    for (const gw of site.gateway_list) {
      const rows = [];
      for (const d of gw.device_list) {
        all += 1;
        if (wanted && d.status !== wanted) continue;
        if (words.length && !matches(words, d.id, d.kind, d.profile)) continue;
        rows.push(el("tr", { "data-device": d.id },
          el("th", { scope: "row" }, el("a", { href: `/devices/${encodeURIComponent(d.id)}`, text: d.name })),
          el("td", { text: d.kind }),
          el("td", {}, badge(d.status), d.anomaly ? el("span", { class: "anomaly", text: " anomaly" }) : ""),
          el("td", { text: timeText(d.last_seen_ms) }),
          alertsCell(d.alerts)));
      }
      if (rows.length === 0 && (wanted || words.length)) continue;
      shown += rows.length;
      siteShown += 1;
      const table = el("table", {},
        el("caption", { class: "visually-hidden", text: `Devices of gateway ${gw.id}` }),
        el("thead", {}, el("tr", {}, ...["Device", "Kind", "Status", "Last reading", "Open alerts"].map(
          (h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "5", text: "No devices yet." }))])));
      siteEl.append(el("section", { class: "gateway", "aria-labelledby": `gw-${gw.id}`, "data-gateway": gw.id },
        el("h3", { id: `gw-${gw.id}` }, `Gateway ${gw.name} `, badge(gw.status)),
        el("p", { class: "summary" },
          `Devices: ${countsText(gw.devices)}. Open alerts: ${alertsText(gw.alerts)}. `,
          el("span", { "data-backlog": gw.id, text: `Backlog: ${gw.backlog} readings.` }),
          gw.readings_dropped ? ` Dropped: ${gw.readings_dropped}.` : ""),
        el("div", { class: "scroll" }, table)));
    }
    if (siteShown > 0 || !(wanted || words.length)) sitesEl.append(siteEl);
  }
  if (summary.sites.length === 0) sitesEl.append(el("p", { text: "No gateway has sent anything yet." }));
  shownEl.textContent = `Showing ${shown} of ${all} devices.`;
}

function update(next) {
  summary = next;
  renderTotals();
  render();
}

function connect() {
  const source = new EventSource("/api/v1/stream/fleet");
  source.addEventListener("fleet", (event) => {
    update(JSON.parse(event.data));
    liveEl.textContent = `Live: updated ${new Date().toLocaleTimeString()}`;
    liveEl.dataset.state = "live";
  });
  source.addEventListener("error", async () => {
    liveEl.textContent = "Live updates interrupted; reconnecting…";
    liveEl.dataset.state = "reconnecting";
    if (source.readyState === EventSource.CLOSED) {
      // The hub refused the stream: signed out or the session expired.
      const me = await fetch("/api/v1/auth/me", { credentials: "same-origin" });
      if (me.status === 401) window.location.assign(`/login?next=${encodeURIComponent("/fleet")}`);
      else setTimeout(connect, 5000);
    }
  });
}

searchEl.addEventListener("input", render);
statusEl.addEventListener("change", render);
document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
update(summary);
connect();

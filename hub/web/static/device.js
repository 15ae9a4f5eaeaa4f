// Device page: latest values, a hand-drawn SVG line chart per metric over the chosen time range
// (gaps shaded, readings that are not good marked, anomaly events and alerts as vertical lines),
// and the twin picture with its reasons as text. Live by polling the readings API every few
// seconds (one request chain, never overlapping; only what is new since the newest reading).
// Everything from the hub is set with textContent or as SVG attributes: names are data, not markup.

import { api } from "/static/api.js";
import { el, svg } from "/static/dom.js";

const info = JSON.parse(document.getElementById("device-data").textContent);
const base = `/api/v1/devices/${encodeURIComponent(info.id)}`;
const POLL_MS = 4000;
const TWIN_EVERY_MS = 15000;
const PAGE = 10000; // the readings API's largest page
const MAX_PAGES = 10; // at most 100 000 readings per range: the rest is said, not fetched
const MAX_POINTS = 1500; // per chart line; more are thinned (not-good readings are always kept)
const GAP_FACTOR = 3; // a gap: readings further apart than 3x the usual (median) interval
const STATUS_WORDS = { ok: "OK", watch: "Keep an eye on", act: "Needs action", unknown: "No data" };

const liveEl = document.getElementById("live-state");
const rangeEl = document.getElementById("range");
const chartsEl = document.getElementById("charts");
const timelineEl = document.getElementById("timeline");
const qualityEl = document.getElementById("quality-summary");

let generation = 0; // a range change makes older answers obsolete
let series = new Map(); // metric -> [{t, v, q, seq, unit}], oldest first
let seen = new Set(); // metric|ts|seq of the readings held, to drop the repeats of inclusive `since`
let truncated = false;
let anomalies = [];
let alerts = [];
let lastTwin = 0;
let latestKey = "";

function titled(node, text) {
  node.append(svg("title", {}, text));
  return node;
}

function rangeSeconds() {
  return info.ranges.find((r) => r.key === rangeEl.value).seconds;
}

function windowStart() {
  return Date.now() - rangeSeconds() * 1000;
}

function iso(ms) {
  return new Date(ms).toISOString();
}

function timeText(ms, withDate = false) {
  const s = new Date(ms).toISOString();
  return (withDate ? s.slice(5, 10) + " " : "") + s.slice(11, 19) + " UTC";
}

function numeric(v) {
  if (typeof v === "number") return v;
  if (typeof v === "boolean") return v ? 1 : 0;
  return null;
}

function valueText(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return String(Number.isInteger(v) ? v : Number(v.toFixed(3)));
  return String(v);
}

function add(rows) {
  let added = 0;
  for (const r of rows) {
    const key = `${r.metric}|${r.ts}|${r.seq}`;
    if (seen.has(key)) continue;
    seen.add(key);
    const list = series.get(r.metric) || [];
    const point = { t: Date.parse(r.ts), v: r.value, q: r.quality, seq: r.seq, unit: r.unit };
    // Nearly always appended; a late reading (a gateway's backlog) goes to its place in time.
    if (list.length && list[list.length - 1].t > point.t) {
      const at = list.findIndex((p) => p.t > point.t);
      list.splice(at, 0, point);
    } else list.push(point);
    series.set(r.metric, list);
    added += 1;
  }
  return added;
}

function trim() {
  const start = windowStart();
  for (const [metric, list] of series) {
    const first = list.findIndex((p) => p.t >= start);
    const dropped = first < 0 ? list : list.slice(0, first);
    for (const p of dropped) seen.delete(`${metric}|${iso(p.t)}|${p.seq}`);
    if (first < 0) series.delete(metric);
    else if (first > 0) series.set(metric, list.slice(first));
  }
}

function newest() {
  let t = null;
  for (const list of series.values()) if (list.length && (t === null || list[list.length - 1].t > t)) t = list[list.length - 1].t;
  return t;
}

async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function loadRange(gen) {
  series = new Map();
  seen = new Set();
  truncated = false;
  let since = iso(windowStart());
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const rows = await getJson(`${base}/readings?since=${encodeURIComponent(since)}&limit=${PAGE}`);
    if (gen !== generation) return;
    add(rows);
    if (rows.length < PAGE) return;
    since = rows[rows.length - 1].ts; // inclusive: its repeats are dropped by `seen`
  }
  truncated = true;
}

async function loadNew(gen) {
  const t = newest();
  const since = iso(t === null ? windowStart() : t);
  const rows = await getJson(`${base}/readings?since=${encodeURIComponent(since)}&limit=${PAGE}`);
  if (gen === generation) add(rows);
}

async function loadMarks(gen) {
  const since = encodeURIComponent(iso(windowStart()));
  const [events, list] = await Promise.all([
    getJson(`${base}/anomalies?since=${since}&limit=1000`),
    getJson(`/api/v1/alerts?device=${encodeURIComponent(info.id)}&limit=200`),
  ]);
  if (gen !== generation) return;
  anomalies = events;
  alerts = list;
}

async function loadLatest() {
  const data = await getJson(`${base}/latest`);
  const key = JSON.stringify(data.metrics);
  if (key === latestKey) return false;
  latestKey = key;
  const body = document.querySelector("#latest tbody");
  const rows = Object.entries(data.metrics).map(([metric, r]) =>
    el("tr", { "data-metric": metric },
      el("th", { scope: "row", text: metric }),
      el("td", { class: "num", "data-value": "", text: valueText(r.value) }),
      el("td", { text: r.unit }),
      el("td", { "data-quality": "", class: r.quality === "good" ? "" : "quality-bad", text: r.quality }),
      el("td", { text: r.ts })));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "5", text: "No readings yet." }))]));
  return true;
}

// Typical interval: the median gap between consecutive readings (robust against the gaps themselves).
function gapsOf(list) {
  if (list.length < 3) return [];
  const deltas = [];
  for (let i = 1; i < list.length; i += 1) deltas.push(list[i].t - list[i - 1].t);
  const sorted = deltas.filter((d) => d > 0).sort((a, b) => a - b);
  if (!sorted.length) return [];
  const typical = sorted[Math.floor(sorted.length / 2)];
  const gaps = [];
  for (let i = 1; i < list.length; i += 1) {
    if (deltas[i - 1] > GAP_FACTOR * typical) gaps.push({ from: list[i - 1].t, to: list[i].t, typical });
  }
  return gaps;
}

function thin(list) {
  if (list.length <= MAX_POINTS) return list;
  const step = Math.ceil(list.length / MAX_POINTS);
  return list.filter((p, i) => i % step === 0 || p.q !== "good" || i === list.length - 1);
}

function durationText(ms) {
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function marks() {
  const out = [];
  for (const e of anomalies) {
    const score = e.details && typeof e.details.score === "number" ? ` (score ${valueText(e.details.score)})` : "";
    out.push({ t: Date.parse(e.ts), kind: e.type === "anomaly_started" ? "anomaly" : "cleared",
      text: `${e.type === "anomaly_started" ? "Anomaly started" : "Anomaly cleared"}${score}` });
  }
  for (const a of alerts) {
    if (a.opened_at) out.push({ t: Date.parse(a.opened_at), kind: "alert", text: `Alert opened (${a.severity}): ${a.message}` });
    if (a.cleared_at) out.push({ t: Date.parse(a.cleared_at), kind: "alert-cleared",
      text: `Alert cleared by ${a.cleared_by}: ${a.message}` });
  }
  return out.sort((a, b) => a.t - b.t);
}

// Drawn at the width it is shown at (re-read at every render), so text is never stretched.
let W = 800;
const H = 190;
const PAD = { l: 64, r: 12, t: 12, b: 26 };

function chart(metric, list, t0, t1, events) {
  const unit = list.length ? list[list.length - 1].unit : "";
  const points = thin(list);
  const values = points.map((p) => numeric(p.v)).filter((v) => v !== null && Number.isFinite(v));
  let lo = values.length ? Math.min(...values) : 0;
  let hi = values.length ? Math.max(...values) : 1;
  if (lo === hi) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const pw = W - PAD.l - PAD.r;
  const ph = H - PAD.t - PAD.b;
  const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * pw;
  const y = (v) => PAD.t + (1 - (v - lo) / (hi - lo)) * ph;
  const gaps = gapsOf(list);
  const notGood = list.filter((p) => p.q !== "good");
  const bad = notGood.filter((p) => p.q === "bad").length;
  const stale = notGood.length - bad;

  const label = `${metric}${unit ? ` (${unit})` : ""}: ${list.length} readings, ${gaps.length} gaps, ` +
    `${notGood.length} not good`;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, class: "chart" });
  root.append(svg("rect", { x: PAD.l, y: PAD.t, width: pw, height: ph, class: "plot" }));
  for (const g of gaps) {
    const x0 = Math.max(PAD.l, x(g.from));
    root.append(titled(svg("rect", { x: x0, y: PAD.t, width: Math.max(2, x(g.to) - x0), height: ph, class: "gap",
      "data-gap": "" }), `No readings for ${durationText(g.to - g.from)} (usually every ${durationText(g.typical)}), ` +
      `${timeText(g.from)} to ${timeText(g.to)}`));
  }
  // Axes: value range at the left, time range below.
  root.append(svg("text", { x: PAD.l - 6, y: PAD.t + 10, class: "axis", "text-anchor": "end" }, valueText(hi)));
  root.append(svg("text", { x: PAD.l - 6, y: PAD.t + ph, class: "axis", "text-anchor": "end" }, valueText(lo)));
  const withDate = t1 - t0 > 86_400_000;
  root.append(svg("text", { x: PAD.l, y: H - 6, class: "axis" }, timeText(t0, withDate)));
  root.append(svg("text", { x: W - PAD.r, y: H - 6, class: "axis", "text-anchor": "end" }, timeText(t1, withDate)));

  // The line breaks at gaps and at readings without a usable value.
  const gapStarts = new Set(gaps.map((g) => g.to));
  let d = "";
  let pen = false;
  for (const p of points) {
    const v = numeric(p.v);
    if (p.q !== "good" || v === null || !Number.isFinite(v)) { pen = false; continue; }
    if (gapStarts.has(p.t)) pen = false;
    d += `${pen ? "L" : "M"}${x(p.t).toFixed(1)},${y(v).toFixed(1)}`;
    pen = true;
  }
  if (d) root.append(svg("path", { d, class: "line" }));
  for (const p of points) {
    if (p.q === "good") continue;
    const v = numeric(p.v);
    const cx = x(p.t);
    const cy = v === null || !Number.isFinite(v) ? PAD.t + ph - 6 : y(v);
    root.append(titled(svg("path", { d: `M${cx - 5},${cy - 5}L${cx + 5},${cy + 5}M${cx - 5},${cy + 5}L${cx + 5},${cy - 5}`,
      class: `bad bad-${p.q}`, "data-bad": p.q }), `${p.q} reading at ${timeText(p.t)}: ${valueText(p.v)}`));
  }
  for (const m of events) {
    if (m.t < t0 || m.t > t1) continue;
    root.append(titled(svg("line", { x1: x(m.t), x2: x(m.t), y1: PAD.t, y2: PAD.t + ph, class: `event event-${m.kind}`,
      "data-event": m.kind }), `${timeText(m.t, true)}: ${m.text}`));
  }
  const last = list.length ? list[list.length - 1] : null;
  const caption = el("figcaption", {},
    el("strong", { text: metric }), unit ? ` (${unit})` : "",
    last ? ` — latest ${valueText(last.v)} at ${timeText(last.t)}. ` : ". ",
    el("span", { "data-count": "readings", text: `${list.length} readings` }), ", ",
    el("span", { "data-count": "gaps", text: `${gaps.length} ${gaps.length === 1 ? "gap" : "gaps"}` }), ", ",
    el("span", { "data-count": "not-good", text: `${notGood.length} not good` }),
    notGood.length ? ` (bad: ${bad}, stale: ${stale})` : "", ".");
  return { node: el("figure", { class: "chart-box", "data-chart": metric }, caption, root), gaps: gaps.length,
    notGood: notGood.length, bad, stale, count: list.length };
}

function render() {
  // Two charts side by side on wide screens (device_pages.css): each half the width, less the gap.
  const full = Math.round(chartsEl.clientWidth || 800);
  const twoColumns = getComputedStyle(chartsEl).display === "grid";
  W = Math.max(320, twoColumns ? Math.floor((full - 16) / 2) : full);
  const t1 = Math.max(Date.now(), newest() || 0);
  const t0 = windowStart();
  const events = marks();
  const figures = [];
  let total = 0; let gaps = 0; let notGood = 0; let bad = 0; let stale = 0;
  // The anomaly score first when there is one: it is what the marked events are about.
  const names = [...series.keys()].sort((a, b) => (a === "anomaly_score" ? -1 : b === "anomaly_score" ? 1 : a.localeCompare(b)));
  for (const metric of names) {
    const list = series.get(metric);
    if (!list.some((p) => numeric(p.v) !== null || p.q !== "good")) continue; // text values: table only
    const c = chart(metric, list, t0, t1, events);
    figures.push(c.node);
    total += c.count; gaps += c.gaps; notGood += c.notGood; bad += c.bad; stale += c.stale;
  }
  chartsEl.replaceChildren(...(figures.length ? figures : [el("p", { text: "No readings in this range." })]));
  qualityEl.replaceChildren(
    `${total} readings in range; `,
    el("span", { id: "gap-count", text: `${gaps} ${gaps === 1 ? "gap" : "gaps"}` }),
    " longer than 3× the usual interval; ",
    el("span", { id: "bad-count", text: `${notGood} not good` }),
    notGood ? ` (bad: ${bad}, stale: ${stale})` : "", ".",
    truncated ? ` Only the first ${MAX_PAGES * PAGE} readings are shown: choose a shorter range.` : "");
  const inRange = events.filter((m) => m.t >= t0 && m.t <= t1);
  timelineEl.replaceChildren(...(inRange.length
    ? inRange.map((m) => el("li", { "data-event": m.kind }, el("time", { datetime: iso(m.t), text: timeText(m.t, true) }),
      ` ${m.text}`))
    : [el("li", { text: "No anomaly events or alerts in this range." })]));
}

async function loadTwin() {
  lastTwin = Date.now();
  const [health, picture] = await Promise.all([getJson(`${base}/health`), api(`${base}/twin.svg`)]);
  if (picture.ok) {
    // Inline (not <img>): the parts' <title> hover texts and focus only work in the page's DOM.
    const doc = new DOMParser().parseFromString(await picture.text(), "image/svg+xml");
    const root = doc.documentElement;
    if (root.nodeName === "svg") {
      for (const s of root.querySelectorAll("script, foreignObject")) s.remove();
      document.getElementById("twin").replaceChildren(document.importNode(root, true));
    }
  }
  document.getElementById("twin-summary").textContent = health.summary;
  const items = health.components.map((c) => el("li", { "data-component": c.id, "data-status": c.status },
    el("strong", { text: c.label }), ": ",
    el("span", { class: `twin-word twin-word-${c.status}`, text: STATUS_WORDS[c.status] || c.status }),
    c.reading ? ` (${c.reading})` : "", ` — ${c.reason}`));
  for (const n of health.notes || []) items.push(el("li", { class: "note", text: n }));
  document.getElementById("reasons").replaceChildren(...items);
}

async function refresh(full) {
  const gen = generation;
  if (full) await loadRange(gen);
  else await loadNew(gen);
  await loadMarks(gen);
  const changed = await loadLatest();
  if (gen !== generation) return;
  trim();
  render();
  if (changed || full || Date.now() - lastTwin > TWIN_EVERY_MS) await loadTwin();
  liveEl.textContent = `Live: updated ${new Date().toLocaleTimeString()}`;
  liveEl.dataset.state = "live";
}

let timer = null;
let busy = Promise.resolve();
function schedule(full) {
  // One chain: a refresh waits for the one before it, so polls never overlap or pile up.
  busy = busy.then(() => tick(full));
}

async function tick(full = false) {
  clearTimeout(timer);
  try {
    if (!document.hidden || full) await refresh(full);
  } catch (err) {
    liveEl.textContent = `Live updates interrupted (${err.message}); retrying…`;
    liveEl.dataset.state = "reconnecting";
  }
  timer = setTimeout(() => schedule(false), POLL_MS);
}

rangeEl.addEventListener("change", () => {
  generation += 1;
  liveEl.textContent = "Loading readings…";
  liveEl.dataset.state = "loading";
  schedule(true);
});
document.getElementById("range-form").addEventListener("submit", (e) => e.preventDefault());
schedule(true);

// What-if page: the form goes to POST /api/v1/whatif (through api.js: CSRF header); the answer is
// drawn as hand-written SVG line charts (no library), with the anomaly score against its
// threshold and the list of alarms that would fire. Text goes in with textContent. Choosing a boiler
// of the fleet fills the setpoint and outdoor inputs with its latest readings (rendered into the
// options by the server) and sends its uid: the hub then scores with the model its gateway runs.
import { api } from "/static/api.js";
import { el, svg } from "/static/dom.js";

// Okabe–Ito colours (distinguishable with common colour-vision deficiencies), each line also dashed
// differently and named in the legend: colour is never the only cue.
const STYLES = [
  { color: "#0072B2", dash: "" }, { color: "#D55E00", dash: "6 3" },
  { color: "#009E73", dash: "2 2" }, { color: "#CC79A7", dash: "8 3 2 3" },
];
const CHARTS = [
  { id: "temperatures", title: "Temperatures", unit: "°C",
    lines: [["flow_temp", "flow"], ["return_temp", "return"], ["flue_temp", "flue"], ["outdoor_temp", "outdoor"]] },
  { id: "pressure", title: "Water pressure", unit: "bar", lines: [["pressure", "pressure"]] },
  { id: "heat", title: "Heat", unit: "kW", lines: [["heat_demand", "demand"], ["heat_load", "delivered"]] },
  { id: "modulation", title: "Burner modulation", unit: "%", lines: [["modulation", "modulation"]] },
];

const form = document.getElementById("whatif-form");
const runEl = document.getElementById("w-run");
const statusEl = document.getElementById("whatif-status");
const errorEl = document.getElementById("whatif-error");
const resultsEl = document.getElementById("results");
const boilerEl = document.getElementById("boiler");
const boilerHelpEl = document.getElementById("boiler-help");
// Inputs a fleet boiler's latest readings fill: [input id, option data key, what it is].
const FROM_DEVICE = [["w-setpoint", "setpoint", "setpoint"], ["w-outdoor", "outdoor", "outdoor temperature"]];

function niceStep(span, count) {
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

function fmt(v, step) {
  const places = Math.max(0, -Math.floor(Math.log10(step)));
  return v.toFixed(Math.min(places, 3));
}

// One chart: lines over hours, optional horizontal reference lines ({value, label}).
function lineChart({ id, title, unit, hours, lines, refs = [] }) {
  const W = 720, H = 240, L = 56, R = 12, T = 12, B = 36;
  const values = lines.flatMap((l) => l.values).concat(refs.map((r) => r.value)).filter(Number.isFinite);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const step = niceStep(hi - lo, 5);
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step) * step;
  const tMax = hours[hours.length - 1] || 1;
  const x = (h) => L + (h / tMax) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const titleId = `chart-${id}-title`, descId = `chart-${id}-desc`;
  const summary = lines.map((l) => {
    const v = l.values.filter(Number.isFinite);
    return `${l.name} ${fmt(Math.min(...v), step / 10)} to ${fmt(Math.max(...v), step / 10)} ${unit}`;
  }).join("; ");
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${titleId} ${descId}`,
    class: "chart", "data-chart": id });
  root.append(svg("title", { id: titleId }, `${title} (${unit}) over ${fmt(tMax, 0.1)} h`));
  root.append(svg("desc", { id: descId }, summary + (refs.length ? "; " + refs.map((r) => `${r.label} ${r.value}`).join("; ") : "")));
  for (let v = lo; v <= hi + step / 2; v += step) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, fmt(v, step)));
  }
  const hStep = niceStep(tMax, 6);
  for (let h = 0; h <= tMax + 1e-9; h += hStep) {
    root.append(svg("text", { x: x(h), y: H - B + 16, "text-anchor": "middle", class: "tick" }, fmt(h, hStep)));
  }
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, "hours from start"));
  root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  for (const r of refs) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(r.value), y2: y(r.value), class: "ref", "data-ref": r.label }));
    root.append(svg("text", { x: W - R - 4, y: y(r.value) - 4, "text-anchor": "end", class: "ref-label" },
      `${r.label} ${r.value}`));
  }
  lines.forEach((l, i) => {
    const s = STYLES[i % STYLES.length];
    const pts = [];
    l.values.forEach((v, k) => { if (Number.isFinite(v)) pts.push(`${x(hours[k]).toFixed(1)},${y(v).toFixed(1)}`); });
    root.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 2,
      "stroke-dasharray": s.dash, "data-series": l.name }));
  });
  const legend = el("ul", { class: "legend" }, ...lines.map((l, i) => {
    const s = STYLES[i % STYLES.length];
    const key = svg("svg", { viewBox: "0 0 30 10", width: 30, height: 10, "aria-hidden": "true" });
    key.append(svg("line", { x1: 0, x2: 30, y1: 5, y2: 5, stroke: s.color, "stroke-width": 3, "stroke-dasharray": s.dash }));
    return el("li", {}, key, ` ${l.name}`);
  }), ...refs.map((r) => el("li", { class: "ref-key", text: `- - ${r.label}` })));
  return el("figure", { class: "chart-box" }, el("figcaption", { text: `${title} (${unit})` }), root, legend);
}

function hoursText(tH) {
  const h = Math.floor(tH), m = Math.round((tH - h) * 60);
  return `${tH.toFixed(2)} h (${h} h ${m} min)`;
}

// Why this model version: the version chosen, assigned fleet-wide, or what the boiler's gateway runs.
function modelWhy(m) {
  if (m.source === "gateway") {
    return `the version gateway ${m.gateway} runs` +
      (m.scope === "gateway" ? ", assigned to that gateway" : ", the fleet-wide assignment");
  }
  if (m.source === "chosen") return "the version chosen";
  return "the version assigned fleet-wide";
}

function render(res) {
  const hours = res.series.t_s.map((t) => t / 3600);
  const charts = document.getElementById("charts");
  charts.replaceChildren();
  for (const c of CHARTS) {
    const lines = c.lines.filter(([m]) => res.series.metrics[m])
      .map(([m, name]) => ({ name, values: res.series.metrics[m].values }));
    if (lines.length) charts.append(lineChart({ ...c, hours, lines }));
  }
  const an = res.anomaly;
  const summaryEl = document.getElementById("anomaly-summary");
  summaryEl.dataset.modelSource = an.model ? an.model.source : "";
  if (an.status === "scored") {
    const refs = [{ value: an.threshold, label: "alarm threshold" }];
    charts.append(lineChart({ id: "score", title: "Anomaly score", unit: "score",
      hours: an.series.t_s.map((t) => t / 3600), lines: [{ name: "score", values: an.series.score }], refs }));
    summaryEl.textContent = `Anomaly model ${an.model.name} v${an.model.version} (${modelWhy(an.model)}): ` +
      `highest score ${an.max_score} ` +
      `(alarm above ${an.threshold}); ` + (an.first_alarm_s === null ? "it would not raise an alarm."
        : `it would first raise an alarm after ${hoursText(an.first_alarm_s / 3600)}.`);
  } else {
    const named = an.model ? ` ${an.model.name} v${an.model.version} (${modelWhy(an.model)})` : "";
    summaryEl.textContent = `Anomaly model${named}: ${an.status.replaceAll("_", " ")}` +
      `${an.detail ? ` (${an.detail})` : ""}.`;
  }
  if (res.device) summaryEl.textContent = `Boiler ${res.device}. ${summaryEl.textContent}`;
  const list = document.getElementById("alarms");
  list.replaceChildren();
  for (const a of res.alarms) {
    list.append(el("li", { "data-alarm": a.name, "data-source": a.source },
      el("strong", { text: `After ${hoursText(a.t_h)}: ` }),
      el("span", { class: `sev sev-${a.severity}`, text: a.severity }),
      ` ${a.name} — ${a.message} (${a.source === "rule" ? "alert rule" : a.source === "model" ? "anomaly model" : "boiler's own protection"})`));
  }
  if (res.alarms.length === 0) list.append(el("li", { text: "No alarm would fire within the horizon." }));
  resultsEl.hidden = false;
}

function body() {
  const out = {};
  if (boilerEl.value) out.device = boilerEl.value;
  for (const input of form.querySelectorAll("input")) {
    if (input.value.trim() === "") continue;  // e.g. heat demand: the daily schedule
    out[input.name] = Number(input.value);
  }
  return out;
}

// A boiler chosen: its latest readings into the inputs (the generic defaults where it has none),
// and the hint says what was filled in and which model will score.
boilerEl.addEventListener("change", () => {
  const option = boilerEl.selectedOptions[0];
  const filled = [], generic = [];
  for (const [id, key, what] of FROM_DEVICE) {
    const input = document.getElementById(id);
    const value = option.value ? option.dataset[key] : undefined;
    input.value = value !== undefined ? value : input.defaultValue;
    (value !== undefined ? filled : generic).push(`${what} ${input.value} °C`);
  }
  if (!option.value) {
    boilerHelpEl.textContent = "The simulator's generic boiler, scored with the fleet-wide anomaly model.";
    return;
  }
  boilerHelpEl.textContent = (filled.length ? `Latest readings filled in: ${filled.join(", ")}. ` : "") +
    (generic.length ? `No reading, generic value: ${generic.join(", ")}. ` : "") +
    `Scored with the anomaly model version that gateway ${option.dataset.gateway} runs.`;
});

function detailText(b) {
  if (b && typeof b.detail === "string") return b.detail;
  if (b && Array.isArray(b.detail)) return b.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  return "";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  errorEl.hidden = true;
  errorEl.textContent = "";
  runEl.disabled = true;
  resultsEl.setAttribute("aria-busy", "true");
  statusEl.textContent = "Running the simulation…";
  statusEl.dataset.state = "busy";
  try {
    const response = await api("/api/v1/whatif", { method: "POST", body: body() });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      render(answer);
      statusEl.textContent = `Done: ${answer.alarms.length} alarm(s) would fire within ${answer.scenario.horizon_h} h.`;
      statusEl.dataset.state = "done";
    } else {
      const wait = response.headers.get("Retry-After");
      errorEl.textContent = response.status === 429
        ? `The simulator is busy with other runs. Try again in ${wait || "a few"} seconds.`
        : `The simulation was refused: ${detailText(answer) || response.status}`;
      errorEl.hidden = false;
      statusEl.textContent = "";
      statusEl.dataset.state = "error";
    }
  } catch (err) {
    errorEl.textContent = `Could not reach the hub: ${err.message}`;
    errorEl.hidden = false;
    statusEl.dataset.state = "error";
  } finally {
    runEl.disabled = false;
    resultsEl.removeAttribute("aria-busy");
  }
});

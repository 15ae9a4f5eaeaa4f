// Meter page: cost to date and statements (staff; from /api/v1/meters/{id}/cost and
// /api/v1/statements) and the reading-entry dialog. The estimate in the dialog is computed here
// from values the server put in the page, in exact decimal arithmetic (BigInt, no floats); the
// server checks the reading and the statement is authoritative. Text goes in with textContent.
import { api } from "/static/api.js";
import { el } from "/static/dom.js";

const data = JSON.parse(document.getElementById("meter-data").textContent);
const enc = encodeURIComponent(data.meter);
const dialog = document.getElementById("reading-dialog");
const form = document.getElementById("reading-form");
const valueEl = document.getElementById("r-value");
const previousEl = document.getElementById("r-previous");
const estimateEl = document.getElementById("r-estimate");
const resultEl = document.getElementById("reading-result");
const submitEl = document.getElementById("r-submit");
const statusEl = document.getElementById("page-status");

// -- exact decimals ------------------------------------------------------------------------------

const DECIMAL = /^\d+(\.\d+)?$/;

function parseDecimal(text) {
  // "123.45" -> {n: 12345n, scale: 2}; null if not a plain non-negative decimal.
  const t = String(text).trim();
  if (!DECIMAL.test(t)) return null;
  const [whole, frac = ""] = t.split(".");
  return { n: BigInt(whole + frac), scale: frac.length };
}

function align(a, b) {
  const scale = Math.max(a.scale, b.scale);
  return [a.n * 10n ** BigInt(scale - a.scale), b.n * 10n ** BigInt(scale - b.scale), scale];
}

function format(n, scale) {
  const neg = n < 0n;
  const digits = (neg ? -n : n).toString().padStart(scale + 1, "0");
  const text = scale ? `${digits.slice(0, -scale)}.${digits.slice(-scale)}` : digits;
  return (neg ? "-" : "") + text;
}

function roundHalfUp(n, scale, places) {
  // Ties away from zero, as the hub rounds money (docs/billing.md); n >= 0 here.
  if (scale <= places) return n * 10n ** BigInt(places - scale);
  const d = 10n ** BigInt(scale - places);
  const q = n / d;
  return 2n * (n % d) >= d ? q + 1n : q;
}

// -- the estimate --------------------------------------------------------------------------------

function estimate() {
  const text = valueEl.value.trim();
  if (text === "") return "—";
  const value = parseDecimal(text);
  if (value === null || value.scale > 3) return "— (type the reading as a number with at most 3 decimals)";
  const previous = parseDecimal(previousEl.value);
  if (previous === null) return "— (no previous reading to compare with)";
  const [v, p, scale] = align(value, previous);
  const used = v - p;
  if (used < 0n) return "— (lower than the previous reading)";
  if (!data.tariff) return `${format(used, scale)} kWh; no tariff in force, so no price`;
  const rate = parseDecimal(data.tariff.rate);
  const minor = data.tariff.minor;
  const amount = roundHalfUp(used * rate.n, scale + rate.scale, minor);
  return `${format(amount, minor)} ${data.tariff.currency} ` +
    `(${format(roundHalfUp(used, scale, 3), 3)} kWh × ${data.tariff.rate} ${data.tariff.currency}/kWh)`;
}

function updateEstimate() {
  estimateEl.textContent = estimate();
}

// -- the dialog ----------------------------------------------------------------------------------

function detailText(body) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  return "";
}

async function submit(event) {
  event.preventDefault();
  resultEl.textContent = "";
  const value = valueEl.value.trim();
  if (value === "") {
    resultEl.textContent = "Type the new reading first.";
    valueEl.focus();
    return;
  }
  submitEl.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    const response = await api(`/api/v1/meters/${enc}/readings`, {
      method: "POST", body: { value, ts: new Date().toISOString() } });
    const body = await response.json().catch(() => ({}));
    if (response.status === 201) {
      previousEl.value = body.value;
      document.getElementById("r-previous-when").textContent = `at ${body.ts}`;
      document.getElementById("latest").textContent =
        `Latest reading: ${body.value} kWh at ${body.ts} (entered by hand by ${body.submitted_by}).`;
      valueEl.value = "";
      updateEstimate();
      dialog.close();
      const used = body.consumption_kwh !== null ? `, ${body.consumption_kwh} kWh since the previous reading` : "";
      statusEl.textContent = `Reading ${body.value} kWh accepted${used}.`;
      statusEl.dataset.state = "accepted";
      if (data.staff) loadCost();
      document.getElementById("open-reading").focus();
    } else {
      const why = detailText(body) || `the hub answered ${response.status}`;
      resultEl.textContent = `Not accepted: ${why}`;
      valueEl.setAttribute("aria-invalid", "true");
      valueEl.focus();
    }
  } catch (err) {
    resultEl.textContent = `Could not reach the hub: ${err.message}`;
  } finally {
    submitEl.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

document.getElementById("open-reading").addEventListener("click", () => {
  resultEl.textContent = "";
  valueEl.removeAttribute("aria-invalid");
  dialog.showModal();
  valueEl.focus();
});
document.getElementById("r-cancel").addEventListener("click", () => dialog.close());
valueEl.addEventListener("input", () => {
  valueEl.removeAttribute("aria-invalid");
  updateEstimate();
});
form.addEventListener("submit", submit);

// -- cost and statements (staff) -----------------------------------------------------------------

function table(caption, headers, rows, footer = []) {
  return el("div", { class: "scroll" }, el("table", {},
    el("caption", { text: caption }),
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...rows),
    el("tfoot", {}, ...footer)));
}

function row(cells, head = false) {
  return el("tr", {}, ...cells.map((c, i) => (i === 0 && head) ? el("th", { scope: "row", text: c })
    : el("td", { class: i > 1 ? "num" : "", text: c })));
}

function pct(rate) {
  const r = parseDecimal(rate);
  if (r === null) return rate;
  let text = format(r.n * 100n, r.scale);
  if (text.includes(".")) text = text.replace(/0+$/, "").replace(/\.$/, "");
  return `${text} %`;
}

async function loadCost() {
  const costEl = document.getElementById("cost");
  costEl.setAttribute("aria-busy", "true");
  const response = await api(`/api/v1/meters/${enc}/cost?since=${encodeURIComponent(data.since)}`);
  const c = await response.json().catch(() => ({}));
  costEl.replaceChildren();
  costEl.removeAttribute("aria-busy");
  if (!response.ok) {
    costEl.append(el("p", { class: "error", text: `Cost not available: ${detailText(c) || response.status}` }));
    return;
  }
  const cur = c.currency || "";
  costEl.append(el("dl", { class: "figures" },
    el("div", {}, el("dt", { text: "Consumption" }), el("dd", { "data-figure": "kwh", text: `${c.consumption_kwh} kWh` })),
    el("div", {}, el("dt", { text: "Net" }), el("dd", { "data-figure": "net", text: `${c.net} ${cur}` })),
    el("div", {}, el("dt", { text: "VAT" }), el("dd", { "data-figure": "vat", text: `${c.vat_total} ${cur}` })),
    el("div", {}, el("dt", { text: "Total" }), el("dd", { "data-figure": "total", text: `${c.total} ${cur}` }))));
  if (!c.currency) costEl.append(el("p", { text: "No tariff is in force in this period: the energy is not priced." }));
  const lines = [];
  for (const e of c.energy) {
    const r = row([`Energy, band ${e.band}`, e.tariff, `${e.kwh} kWh`, `${e.rate} ${cur}/kWh`, `${e.amount} ${cur}`], true);
    r.dataset.band = e.band;
    lines.push(r);
  }
  for (const s of c.standing_charge) {
    const r = row(["Standing charge", s.tariff, `${s.days} days`, `${s.rate_per_day} ${cur}/day`, `${s.amount} ${cur}`], true);
    r.dataset.line = "standing";
    lines.push(r);
  }
  const footer = [row(["Net", "", "", "", `${c.net} ${cur}`], true)];
  for (const v of c.vat) {
    const r = row([`VAT ${pct(v.rate)}`, "", "", `on ${v.net} ${cur}`, `${v.amount} ${cur}`], true);
    r.dataset.line = "vat";
    footer.push(r);
  }
  footer.push(row(["Total", "", "", "", `${c.total} ${cur}`], true));
  costEl.append(table("Cost by band, standing charge and VAT",
    ["Line", "Tariff", "Quantity", "Rate", "Amount"], lines, footer));
  const notes = [];
  if (c.measured_until) notes.push(`Measured up to ${c.measured_until}; later consumption is not known yet.`);
  if (c.unpriced_kwh !== "0.000") notes.push(`${c.unpriced_kwh} kWh fell in times without a tariff and are not charged.`);
  if (c.unmeasured.length) notes.push(`${c.unmeasured.length} interval(s) could not be measured (meter reset or replaced).`);
  for (const n of notes) costEl.append(el("p", { class: "summary", text: n }));
}

async function loadStatements() {
  const box = document.getElementById("statements");
  const response = await api(`/api/v1/statements?meter=${enc}`);
  const list = await response.json().catch(() => []);
  box.replaceChildren();
  if (!response.ok) {
    box.append(el("p", { class: "error", text: `Statements not available: ${detailText(list) || response.status}` }));
    return;
  }
  if (list.length === 0) {
    box.append(el("p", { text: "No statement has been closed for this meter yet." }));
    return;
  }
  const rows = list.map((s) => {
    const paid = s.status === "paid" ? `paid ${s.paid_at ? s.paid_at.slice(0, 10) : ""}` : "not paid";
    return el("tr", { "data-statement": s.number },
      el("th", { scope: "row" }, el("a", { href: `/api/v1/statements/${encodeURIComponent(s.number)}.pdf`, text: s.number })),
      el("td", { text: `${s.since.slice(0, 10)} to ${s.until.slice(0, 10)}` }),
      el("td", { class: "num", text: `${s.total} ${s.currency}` }),
      el("td", {}, el("span", { class: `pay pay-${s.status}`, text: paid })),
      el("td", { text: s.sent_at ? `sent ${s.sent_at.slice(0, 10)}` : "not sent" }));
  });
  box.append(table("Statements of this meter (PDF on the number)", ["Number", "Period", "Total", "Payment", "E-mail"], rows));
}

updateEstimate();
if (data.staff) {
  loadCost();
  loadStatements();
}

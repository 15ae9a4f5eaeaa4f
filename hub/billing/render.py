"""A statement as HTML (Jinja2, autoescaped) and as PDF (fpdf2: pure Python, no system packages).

Both are rendered from the stored document only, so they show exactly what was issued.
"""

from __future__ import annotations

from typing import Any

from fpdf import FPDF
from jinja2 import Environment, select_autoescape

_ENV = Environment(autoescape=select_autoescape(default=True, default_for_string=True))

_HTML = _ENV.from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Statement {{ d.number }}</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #999;padding:4px 8px}td.n{text-align:right}</style></head>
<body>
<h1>Statement {{ d.number }}</h1>
<p>{{ d.issuer }}</p>
<table>
<tr><th>Statement</th><td>{{ d.number }}</td></tr>
{% if d.meter is defined %}<tr><th>Meter</th><td>{{ d.meter }}</td></tr>
{% else %}<tr><th>Site</th><td>{{ d.site }}</td></tr>{% endif %}
<tr><th>Period</th><td>{{ d.since }} to {{ d.until }}</td></tr>
<tr><th>Issued</th><td>{{ d.issued_at }}</td></tr>
<tr><th>Consumption</th><td>{{ d.consumption_kwh }} kWh</td></tr>
<tr><th>Status</th><td>{{ status }}</td></tr>
</table>
<h2>Line items</h2>
<table>
<tr><th>Meter</th><th>Item</th><th>Quantity</th><th>Rate</th><th>VAT rate</th><th>Amount ({{ d.currency }})</th></tr>
{% for l in d.lines %}<tr><td>{{ l.meter }}</td>
<td>{{ l.tariff }} {{ l.band if l.band else "standing charge" }}</td>
<td class="n">{{ l.quantity }} {{ l.unit }}</td><td class="n">{{ l.rate }}</td>
<td class="n">{{ l.vat_rate }}</td><td class="n">{{ l.amount }}</td></tr>
{% endfor %}</table>
<h2>Totals</h2>
<table>
<tr><th>Net</th><td class="n">{{ d.net }} {{ d.currency }}</td></tr>
{% for v in d.vat %}<tr><th>VAT at {{ v.rate }} on {{ v.net }}</th>
<td class="n">{{ v.amount }} {{ d.currency }}</td></tr>
{% endfor %}<tr><th>VAT total</th><td class="n">{{ d.vat_total }} {{ d.currency }}</td></tr>
<tr><th>Total</th><td class="n"><strong>{{ d.total }} {{ d.currency }}</strong></td></tr>
</table>
<p><small>Content hash (SHA-256): {{ content_hash }}</small></p>
</body></html>
""")


def render_html(document: dict[str, Any], status: str, content_hash: str) -> str:
    """The statement as an HTML page (every value escaped)."""
    return _HTML.render(d=document, status=status, content_hash=content_hash)


def _latin1(text: object) -> str:
    # The PDF core fonts are Latin-1; anything else is replaced rather than failing the statement.
    return str(text).encode("latin-1", "replace").decode("latin-1")


def render_pdf(document: dict[str, Any], status: str, content_hash: str) -> bytes:
    """The statement as a PDF (A4, core Helvetica font)."""
    d = document
    pdf = FPDF(format="A4")
    pdf.set_title(f"Statement {d['number']}")
    pdf.set_creator("twin-hub")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, _latin1(f"Statement {d['number']}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    target = f"Meter {d['meter']}" if "meter" in d else f"Site {d['site']}"
    for text in (d["issuer"], target, f"Period {d['since']} to {d['until']}", f"Issued {d['issued_at']}",
                 f"Consumption {d['consumption_kwh']} kWh", f"Status {status}"):
        pdf.cell(0, 6, _latin1(text), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    widths = (50, 45, 30, 22, 18, 25)
    pdf.set_font("Helvetica", "B", 9)
    for w, h in zip(widths, ("Meter", "Item", "Quantity", "Rate", "VAT", f"Amount {d['currency']}"), strict=True):
        pdf.cell(w, 7, _latin1(h), border=1)
    pdf.ln()
    pdf.set_font("Helvetica", "", 9)
    for line in d["lines"]:
        item = f"{line['tariff']} {line['band'] or 'standing charge'}"
        cells = (line["meter"], item, f"{line['quantity']} {line['unit']}", line["rate"], line["vat_rate"],
                 line["amount"])
        for w, text in zip(widths, cells, strict=True):
            pdf.cell(w, 7, _latin1(text)[:40], border=1, align="R" if w < 45 else "L")
        pdf.ln()
    pdf.ln(4)
    pdf.set_font("Helvetica", "", 10)
    rows = [("Net", d["net"])] + [(f"VAT at {v['rate']} on {v['net']}", v["amount"]) for v in d["vat"]]
    rows += [("VAT total", d["vat_total"])]
    for label, amount in rows:
        pdf.cell(60, 6, _latin1(label))
        pdf.cell(40, 6, _latin1(f"{amount} {d['currency']}"), align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(60, 8, "Total")
    pdf.cell(40, 8, _latin1(f"{d['total']} {d['currency']}"), align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 7)
    pdf.ln(4)
    pdf.cell(0, 5, _latin1(f"Content hash (SHA-256): {content_hash}"), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())

"""Board report of one site: a PDF (A4 landscape) and a PNG of its first page (``docs/report.md``).

Written for people who never read sensor data: a one-line headline ("2 of 3 boilers healthy; 1 needs
attention: low pressure"), the twin picture of the device most at risk, the top risks (open alerts by
severity, anomalies, silent devices), the last week's trends (daily means of flow temperature and
pressure per boiler, energy per meter per day) and the cost to date this month per meter.

:func:`gather` reads everything from the database (async; the cost goes through
:func:`hub.billing.service.meter_cost`, the code behind ``GET /api/v1/meters/{id}/cost``, so the
figures are the same); :func:`render_pdf` / :func:`render_png` draw it with matplotlib's
object-oriented API and the Agg / PDF backends — CPU work the caller runs in a thread.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from hub import queries
from hub.alerts.models import Alert, AlertState
from hub.billing import money
from hub.billing import service as billing
from hub.billing.config import BillingConfig
from hub.billing.consumption import consumption, intervals
from hub.config import StatusConfig
from hub.db import Database
from hub.queries import DAY_MS, AnomalyState, DeviceRow
from hub.status import Status, device_status
from hub.twin import drawing
from hub.twin.health import DeviceHealth as TwinHealth
from hub.twin.health import device_health

TREND_DAYS = 7
"""Days of history in the trend charts (the report's day and the six before it)."""
TREND_METRICS = ("flow_temp", "pressure")
"""Boiler metrics charted as daily means."""
TWIN_SCALE = 2.0
"""The twin picture is drawn at this multiple of its 900 × 600 px (sharp when printed on a third of A4)."""
MAX_RISKS = 4
"""Risks listed on page 1 (all of them on page 2)."""
PAGE_SIZE_IN = (297 / 25.4, 210 / 25.4)
"""A4 landscape in inches."""
PNG_DPI = 150
PNG_SIZE = (int(PAGE_SIZE_IN[0] * PNG_DPI), int(PAGE_SIZE_IN[1] * PNG_DPI))
"""Pixels of the PNG (1753 × 1240)."""

# Okabe–Ito: told apart by people with any common colour-vision deficiency; every colour also has a
# word next to it (severity, legend), so nothing depends on colour alone.
OK_COLOUR = "#009E73"
WARN_COLOUR = "#E69F00"
CRIT_COLOUR = "#D55E00"
INFO_COLOUR = "#0072B2"
GREY = "#555555"
LINE_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
SEVERITY_COLOUR = {"critical": CRIT_COLOUR, "warning": WARN_COLOUR, "info": INFO_COLOUR}
SEVERITY_RANK = {"critical": 2, "warning": 1, "info": 0}

METRIC_WORDS = {"pressure": "pressure", "flow_temp": "flow temperature", "return_temp": "return temperature",
                "flue_temp": "flue temperature", "voltage": "mains voltage", "energy_import": "energy readings",
                "level": "tank level", "power": "power"}
KIND_PLURAL = {"boiler": "boilers", "meter": "meters", "tank": "tanks"}


class UnknownSite(LookupError):
    """No site of that name."""


@dataclass(frozen=True)
class Risk:
    """One thing that needs attention, in words."""

    severity: str
    """``critical``, ``warning`` or ``info``."""
    device: str
    """Device uid, or the gateway / site for alerts not about a device."""
    reason: str
    """Plain words: ``low pressure``, ``unusual behaviour``, ``not reporting``."""
    detail: str
    """The alert's message or the anomaly score."""
    since_ms: int | None
    state: str
    """``open``, ``acknowledged``, ``anomaly`` or ``status``."""


@dataclass
class DeviceHealth:
    """A device and what is wrong with it."""

    device: DeviceRow
    status: Status
    anomaly: AnomalyState | None
    risks: list[Risk] = field(default_factory=list)

    @property
    def risk_score(self) -> tuple[int, int, float]:
        """Ordering key, larger = more at risk: worst severity, number of risks, anomaly score."""
        worst = max((SEVERITY_RANK[r.severity] for r in self.risks if r.severity != "info"), default=-1)
        score = self.anomaly.score if self.anomaly and self.anomaly.active and self.anomaly.score else 0.0
        return worst, len(self.risks), score

    @property
    def healthy(self) -> bool:
        """No warning or critical risk."""
        return all(r.severity == "info" for r in self.risks)


@dataclass(frozen=True)
class MeterCost:
    """Cost to date of one meter this month (as ``GET /api/v1/meters/{id}/cost`` gives it)."""

    meter: str
    currency: str | None
    kwh: str
    net: str
    vat: str
    total: str
    unpriced_kwh: str
    error: str | None = None


@dataclass
class ReportData:
    """Everything the report shows, read from the database."""

    site: str
    now_ms: int
    month_start_ms: int
    devices: list[DeviceHealth]
    risks: list[Risk]
    trends: dict[str, dict[str, list[tuple[int, float]]]]
    """metric -> device uid -> [(day start ms, daily mean)]."""
    energy: dict[str, list[tuple[int, float]]]
    """meter uid -> [(day start ms, kWh that day)]."""
    costs: list[MeterCost]
    headline: str = ""
    twin_png: bytes | None = None
    """The twin picture of :attr:`most_at_risk` as PNG (``hub.twin.drawing``); ``None``: a placeholder."""

    @property
    def most_at_risk(self) -> DeviceHealth | None:
        """The device the twin picture shows: the worst risk first, boilers before others on a tie."""
        if not self.devices:
            return None
        return max(self.devices, key=lambda d: (d.risk_score, d.device.kind == "boiler", d.device.uid))

    @property
    def date(self) -> str:
        """The report's (hub clock) UTC date, ``2026-11-01``."""
        return datetime.fromtimestamp(self.now_ms / 1000, UTC).strftime("%Y-%m-%d")

    def site_totals(self) -> dict[str, str]:
        """Currency -> sum of the meters' totals."""
        sums: dict[str, Decimal] = {}
        for c in self.costs:
            if c.currency is not None and c.error is None:
                sums[c.currency] = sums.get(c.currency, Decimal(0)) + Decimal(c.total)
        return {cur: money.fmt(v, cur) for cur, v in sorted(sums.items())}


# -- reading the database ---------------------------------------------------------------------------

def _metric_words(metric: str) -> str:
    return METRIC_WORDS.get(metric, metric.replace("_", " "))


def plain_reason(alert_type: str, metric: str, message: str) -> str:
    """An alert in the words of someone who does not read sensor data."""
    what = _metric_words(metric)
    if alert_type == "threshold":
        if " below " in message:
            return f"low {what}"
        if " above " in message:
            return f"high {what}"
        return f"{what} out of range"
    return {"rate": f"{what} changing fast", "stale": "not reporting", "gateway_offline": "gateway offline",
            "gap": f"missing {what}", "anomaly": "unusual behaviour",
            "human_error": "possible data-entry error"}.get(alert_type, alert_type.replace("_", " "))


def month_start(now_ms: int) -> int:
    """Start of the UTC month holding ``now_ms`` (epoch ms)."""
    d = datetime.fromtimestamp(now_ms / 1000, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()) * 1000


async def _open_alerts(db: Database, site: str) -> list[Alert]:
    with db.activate():
        return list(await Alert.filter(site=site, state__in=[AlertState.OPEN.value, AlertState.ACKNOWLEDGED.value])
                    .order_by("-opened_ms", "-id").limit(500))


async def _cost(db: Database, meter: DeviceRow, since_ms: int, until_ms: int, config: BillingConfig) -> MeterCost:
    try:
        result = await billing.meter_cost(db, meter, since_ms, until_ms, config)
    except billing.BillingError as exc:
        return MeterCost(meter.uid, None, "", "", "", "", "", error=exc.message)
    b = result.bill
    cur = b.currency

    def amount(d: Decimal) -> str:  # as the cost route formats it
        return money.fmt(d, cur) if cur is not None else f"{d:f}"

    return MeterCost(meter.uid, cur, str(money.kwh(b.kwh)), amount(b.net), amount(b.vat_total), amount(b.total),
                     str(money.kwh(b.unpriced_kwh)))


async def _daily_energy(db: Database, meter: DeviceRow, days: Sequence[int], until_ms: int,
                        config: BillingConfig) -> list[tuple[int, float]]:
    # The billing code's consumption (rollovers, resets and manual readings handled as in the bill).
    readings = await billing.register_readings(db, meter.pk, days[0], until_ms)
    series = intervals(readings, config.register_modulus_kwh, config.meter_max_power_kw)
    out: list[tuple[int, float]] = []
    for day in days:
        kwh: Fraction = consumption(series.intervals, day, min(day + DAY_MS, until_ms))
        out.append((day, float(kwh)))
    return out


async def gather(db: Database, site: str, now_ms: int, status_rules: StatusConfig,
                 billing_config: BillingConfig) -> ReportData:
    """Read what the report of ``site`` shows; :class:`UnknownSite` when there is no such site."""
    if await billing.site_pk(db, site) is None:
        raise UnknownSite(site)
    devices = await queries.list_devices(db, site=site)
    anomalies = await queries.anomaly_states(db)
    alerts = await _open_alerts(db, site)
    health = {d.uid: DeviceHealth(d, device_status(d.last_seen_ms, now_ms, status_rules),
                                  anomalies.get((d.gateway_pk, d.name))) for d in devices}
    risks: list[Risk] = []
    anomaly_alerted: set[str] = set()
    for a in alerts:
        risk = Risk(a.severity, a.device or (f"{a.site}.{a.gateway}" if a.gateway else a.site),
                    plain_reason(a.type, a.metric, a.message), a.message, a.opened_ms, a.state)
        risks.append(risk)
        if a.device in health:
            health[a.device].risks.append(risk)
            if a.type == "anomaly":
                anomaly_alerted.add(a.device)
    for h in health.values():
        uid = h.device.uid
        if h.anomaly is not None and h.anomaly.active and uid not in anomaly_alerted:
            score = f" (score {h.anomaly.score:g})" if h.anomaly.score is not None else ""
            risk = Risk("warning", uid, "unusual behaviour", f"anomaly detected at the gateway{score}",
                        h.anomaly.ts_ms, "anomaly")
            risks.append(risk)
            h.risks.append(risk)
        if h.status is Status.OFFLINE and not any(r.reason == "not reporting" for r in h.risks):
            risk = Risk("warning", uid, "not reporting", "no readings for a while (offline)", h.device.last_seen_ms,
                        "status")
            risks.append(risk)
            h.risks.append(risk)
    risks.sort(key=lambda r: (-SEVERITY_RANK.get(r.severity, 0), -(r.since_ms or 0), r.device))

    today = now_ms - now_ms % DAY_MS
    days = [today - i * DAY_MS for i in range(TREND_DAYS - 1, -1, -1)]
    boilers = [d for d in devices if d.kind == "boiler"]
    stats = await queries.daily_stats(db, [d.pk for d in boilers], TREND_METRICS, days[0], now_ms + 1)
    by_pk = {d.pk: d.uid for d in boilers}
    trends: dict[str, dict[str, list[tuple[int, float]]]] = {m: {} for m in TREND_METRICS}
    for s in stats:
        trends[s.metric].setdefault(by_pk[s.device_pk], []).append((s.day_ms, s.mean))

    energy: dict[str, list[tuple[int, float]]] = {}
    costs: list[MeterCost] = []
    start = month_start(now_ms)
    for d in devices:
        if not await billing.is_meter(db, d):
            continue
        energy[d.uid] = await _daily_energy(db, d, days, now_ms, billing_config)
        costs.append(await _cost(db, d, start, now_ms, billing_config))
    data = ReportData(site, now_ms, start, list(health.values()), risks, trends, energy, costs)
    data.headline = headline(data)
    target = data.most_at_risk
    if target is not None:
        # The same picture as the device page (hub/twin): per-part health drawn to PNG in a thread.
        twin = await device_health(db, target.device, now_ms=now_ms, stale_after_s=status_rules.stale_after_s)
        data.twin_png = await asyncio.to_thread(_draw_twin, twin)
    return data


def _draw_twin(twin: TwinHealth) -> bytes:
    with _DRAW_LOCK:  # matplotlib is not thread-safe: one drawing at a time, reports and pictures alike
        return drawing.render_png(twin, scale=TWIN_SCALE)


def headline(data: ReportData) -> str:
    """``2 of 3 boilers healthy; 1 needs attention: low pressure`` (boilers when the site has any)."""
    kind = "boiler" if any(h.device.kind == "boiler" for h in data.devices) else None
    group = [h for h in data.devices if kind is None or h.device.kind == kind]
    noun = KIND_PLURAL[kind] if kind else "devices"
    if not group:
        return "No devices have reported yet"
    sick = [h for h in group if not h.healthy]
    text = f"{len(group) - len(sick)} of {len(group)} {noun} healthy"
    if sick:
        reasons: list[str] = []
        for h in sorted(sick, key=lambda h: h.risk_score, reverse=True):
            for r in sorted(h.risks, key=lambda r: -SEVERITY_RANK.get(r.severity, 0)):
                if r.severity != "info" and r.reason not in reasons:
                    reasons.append(r.reason)
        verb = "needs" if len(sick) == 1 else "need"
        text += f"; {len(sick)} {verb} attention: {', '.join(reasons[:3])}"
    others = [h for h in data.devices if kind is not None and h.device.kind != kind and not h.healthy]
    if others:
        text += f" (and {len(others)} other device{'s' if len(others) > 1 else ''})"
    return text


# -- drawing ---------------------------------------------------------------------------------------

# Matplotlib's global state (rcParams, font cache) is not thread-safe: one report is drawn at a time.
_DRAW_LOCK = threading.Lock()
_RC: Any = {  # Any: matplotlib types the keys as a Literal of every rc name
    "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 8,
    "pdf.fonttype": 42,  # TrueType, not Type 3: text in the PDF can be searched, copied and read aloud
    "axes.spines.top": False, "axes.spines.right": False,
}


def _day_label(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%a\n%d")


def _short(uid: str, site: str) -> str:
    return uid[len(site) + 1:] if uid.startswith(site + ".") else uid


def _twin_panel(ax: Any, data: ReportData) -> None:
    """The twin picture of the device most at risk, or a panel saying why there is none."""
    target = data.most_at_risk
    ax.set_axis_off()
    title = f"Most at risk: {_short(target.device.uid, data.site)}" if target else "No devices"
    ax.set_title(title, loc="left", fontweight="bold")
    image = twin_image(data, target) if target is not None else None
    if image is not None:
        ax.imshow(image)
        return
    ax.add_patch(_rounded_box(ax))
    lines = ["twin picture unavailable", ""]
    if target is not None:
        lines += [f"{target.device.kind} {target.device.name}, {target.status.value}"]
        lines += list(dict.fromkeys(r.reason for r in target.risks)) or ["healthy"]
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", color=GREY, fontsize=10, transform=ax.transAxes)


def _rounded_box(ax: Any) -> Any:
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((0.03, 0.03), 0.94, 0.94, boxstyle="round,pad=0.01", transform=ax.transAxes,
                          facecolor="#F2F2F2", edgecolor="#BBBBBB")


def twin_image(data: ReportData, target: DeviceHealth) -> Any:
    """The twin picture of ``target`` as an RGBA array from :attr:`ReportData.twin_png`; ``None`` without one."""
    if data.twin_png is None:
        return None
    from matplotlib.image import imread

    return imread(io.BytesIO(data.twin_png), format="png")


def _at(ax: Any, x: float, down_pt: float) -> Any:
    """A transform ``down_pt`` points below the top of ``ax`` at axes fraction ``x``: text rows keep
    their spacing in points whatever the panel's size."""
    from matplotlib.transforms import ScaledTranslation

    return ax.transAxes + ScaledTranslation(0, -down_pt / 72, ax.figure.dpi_scale_trans)


def _risks_panel(ax: Any, data: ReportData, limit: int = MAX_RISKS) -> None:
    ax.set_axis_off()
    ax.set_title(f"Top risks ({len(data.risks)} open)", loc="left", fontweight="bold")
    if not data.risks:
        ax.text(0, 1, "Nothing needs attention.", color=OK_COLOUR, fontsize=11, va="top", transform=_at(ax, 0, 6))
        return
    down = 8.0
    for r in data.risks[:limit]:
        colour = SEVERITY_COLOUR.get(r.severity, GREY)
        ax.text(0, 1, r.severity.upper(), color="white", fontsize=8, fontweight="bold", va="center",
                transform=_at(ax, 0, down), bbox={"boxstyle": "round,pad=0.25", "facecolor": colour,
                                                  "edgecolor": colour})
        ax.text(0.27, 1, f"{_short(r.device, data.site)}: {r.reason}", fontsize=10, va="center",
                transform=_at(ax, 0.27, down))
        detail = r.detail.removeprefix(f"{r.device} ")  # the device is named on the line above
        ax.text(0.27, 1, _clip(detail, 40), fontsize=8, color=GREY, va="center", transform=_at(ax, 0.27, down + 12))
        down += 30
    if len(data.risks) > limit:
        ax.text(0, 1, f"… and {len(data.risks) - limit} more (page 2)", fontsize=9, color=GREY, va="center",
                transform=_at(ax, 0, down))


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _cost_panel(ax: Any, data: ReportData, limit: int = 2) -> None:
    ax.set_axis_off()
    month = datetime.fromtimestamp(data.month_start_ms / 1000, UTC).strftime("%B %Y")
    ax.set_title(f"Cost to date, {month}", loc="left", fontweight="bold")
    if not data.costs:
        ax.text(0, 1, "No meters at this site.", fontsize=10, color=GREY, va="top", transform=_at(ax, 0, 6))
        return
    down = 8.0
    for c in data.costs[:limit]:
        if c.error is not None:
            line = f"{_short(c.meter, data.site)}: {_clip(c.error, 40)}"
        elif c.currency is None:
            line = f"{_short(c.meter, data.site)}: {c.kwh} kWh, no tariff"
        else:
            line = f"{_short(c.meter, data.site)}: {c.currency} {c.total}"
            ax.text(0, 1, f"{c.kwh} kWh, net {c.net} + VAT {c.vat}", fontsize=8, color=GREY, va="center",
                    transform=_at(ax, 0, down + 13))
        ax.text(0, 1, line, fontsize=11, va="center", transform=_at(ax, 0, down))
        down += 30
    if len(data.costs) > limit:
        ax.text(0, 1, f"… and {len(data.costs) - limit} more meters (page 2)", fontsize=9, color=GREY, va="center",
                transform=_at(ax, 0, down - 6))
        down += 12
    totals = data.site_totals()
    if totals:
        ax.text(0, 1, "Site total: " + ", ".join(f"{cur} {v}" for cur, v in totals.items()), fontsize=12,
                fontweight="bold", va="center", transform=_at(ax, 0, down))


def _trend_panel(ax: Any, series: dict[str, list[tuple[int, float]]], days: list[int], title: str, unit: str,
                 site: str, bars: bool = False) -> None:
    ax.set_title(title, loc="left", fontweight="bold")
    if not series:
        ax.text(0.5, 0.5, "no readings this week", ha="center", va="center", color=GREY, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    xs = {d: i for i, d in enumerate(days)}
    width = 0.8 / max(1, len(series))
    for n, (uid, points) in enumerate(sorted(series.items())):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        px = [xs[d] for d, _ in points if d in xs]
        py = [v for d, v in points if d in xs]
        if bars:
            ax.bar([x - 0.4 + width * (n + 0.5) for x in px], py, width=width, color=colour,
                   label=_short(uid, site))
        else:
            ax.plot(px, py, marker="o", markersize=4, linewidth=2, color=colour, label=_short(uid, site))
    ax.set_xticks(range(len(days)), [_day_label(d) for d in days])
    ax.set_ylabel(unit)
    ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
    # Below the axis: never over the data, whatever its shape.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(series)), frameon=False)


def _page_one(data: ReportData) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=PAGE_SIZE_IN)
    fig.text(0.03, 0.955, f"Board report — site {data.site}", fontsize=20, fontweight="bold")
    fig.text(0.97, 0.958, data.date, fontsize=12, ha="right", color=GREY)
    healthy = all(h.healthy for h in data.devices)
    fig.text(0.03, 0.905, data.headline, fontsize=14, color=OK_COLOUR if healthy else CRIT_COLOUR,
             fontweight="bold")
    grid = fig.add_gridspec(2, 3, left=0.05, right=0.97, top=0.86, bottom=0.13, hspace=0.3, wspace=0.25,
                            height_ratios=[1.4, 1])
    # The picture gets two thirds of the width: its labels must stay readable on paper.
    _twin_panel(fig.add_subplot(grid[0, 0:2]), data)
    right = grid[0, 2].subgridspec(2, 1, height_ratios=[1.7, 1], hspace=0.3)
    _risks_panel(fig.add_subplot(right[0]), data)
    _cost_panel(fig.add_subplot(right[1]), data)
    days = _days(data)
    _trend_panel(fig.add_subplot(grid[1, 0]), data.trends.get("flow_temp", {}), days,
                 "Flow temperature (daily mean)", "°C", data.site)
    _trend_panel(fig.add_subplot(grid[1, 1]), data.trends.get("pressure", {}), days,
                 "Boiler pressure (daily mean)", "bar", data.site)
    _trend_panel(fig.add_subplot(grid[1, 2]), data.energy, days, "Energy per day", "kWh", data.site, bars=True)
    fig.text(0.03, 0.015, f"Generated {datetime.fromtimestamp(data.now_ms / 1000, UTC):%Y-%m-%d %H:%M} UTC by the "
             "digital twin hub. Costs: this month so far (from the 1st, UTC), from the meters' registers "
             "and their tariffs, VAT included; the monthly statements are authoritative.", fontsize=8,
             color=GREY)
    return fig


def _days(data: ReportData) -> list[int]:
    today = data.now_ms - data.now_ms % DAY_MS
    return [today - i * DAY_MS for i in range(TREND_DAYS - 1, -1, -1)]


def _page_two(data: ReportData) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=PAGE_SIZE_IN)
    fig.text(0.03, 0.955, f"Details — site {data.site}, {data.date}", fontsize=16, fontweight="bold")
    y = 0.9
    fig.text(0.03, y, "Devices", fontsize=12, fontweight="bold")
    for h in sorted(data.devices, key=lambda h: h.device.uid)[:20]:
        y -= 0.025
        state = "healthy" if h.healthy else ", ".join(dict.fromkeys(r.reason for r in h.risks if r.severity != "info"))
        fig.text(0.04, y, f"{_short(h.device.uid, data.site)} ({h.device.kind}, {h.status.value}): {state}",
                 fontsize=9)
    y -= 0.045
    fig.text(0.03, y, "All open risks", fontsize=12, fontweight="bold")
    for r in data.risks[:25]:
        y -= 0.025
        if y < 0.05:
            break
        fig.text(0.04, y, f"[{r.severity}] {_short(r.device, data.site)}: {r.reason} — {_clip(r.detail, 110)}",
                 fontsize=9, color=SEVERITY_COLOUR.get(r.severity, GREY) if r.severity == "critical" else "black")
    x, y = 0.62, 0.9
    fig.text(x, y, "Cost to date per meter", fontsize=12, fontweight="bold")
    for c in data.costs[:20]:
        y -= 0.025
        if c.error is not None or c.currency is None:
            fig.text(x + 0.01, y, f"{_short(c.meter, data.site)}: {c.error or 'no tariff'}", fontsize=9)
            continue
        fig.text(x + 0.01, y, f"{_short(c.meter, data.site)}: {c.kwh} kWh, net {c.net}, VAT {c.vat}, "
                              f"total {c.currency} {c.total}", fontsize=9)
        if c.unpriced_kwh not in ("0", "0.000"):
            y -= 0.022
            fig.text(x + 0.02, y, f"{c.unpriced_kwh} kWh not priced (no tariff in force)", fontsize=8, color=GREY)
    return fig


def render_pdf(data: ReportData) -> bytes:
    """The report as PDF bytes (page 1 the summary, page 2 the details). CPU-bound: call in a thread."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    created = datetime.fromtimestamp(data.now_ms / 1000, UTC)
    out = io.BytesIO()
    meta = {"Title": f"Board report {data.site} {data.date}", "Author": "Digital twin hub",
            "CreationDate": created, "ModDate": created}
    with _DRAW_LOCK, matplotlib.rc_context(_RC), PdfPages(out, metadata=meta) as pdf:
        for fig in (_page_one(data), _page_two(data)):
            pdf.savefig(fig)
    return out.getvalue()


def render_png(data: ReportData, dpi: int = PNG_DPI) -> bytes:
    """Page 1 as PNG bytes (A4 landscape at ``dpi``: 1753 × 1240 at 150). CPU-bound: call in a thread."""
    import matplotlib

    out = io.BytesIO()
    with _DRAW_LOCK, matplotlib.rc_context(_RC):
        _page_one(data).savefig(out, format="png", dpi=dpi,
                                metadata={"Title": f"Board report {data.site} {data.date}"})
    return out.getvalue()

"""The fleet summary the dashboard shows: sites → gateways → devices with status and alert counts.

One builder, :func:`fleet_summary`, serves ``GET /api/v1/fleet/summary``, the first event of
``GET /api/v1/stream/fleet`` and every later one (:mod:`hub.live`), so the page, the stream and
the JSON endpoint cannot disagree. It reads through :mod:`hub.queries` and the status rules of
:mod:`hub.status`, like ``/api/v1/devices`` and ``/api/v1/gateways`` do.
"""

from __future__ import annotations

from typing import Any

from tortoise.functions import Count

from hub import queries
from hub.alerts.models import Alert, AlertState
from hub.alerts.rules import Severity
from hub.config import StatusConfig
from hub.db import Database
from hub.status import Status, device_status, gateway_status

OPEN_STATES = (AlertState.OPEN.value, AlertState.ACKNOWLEDGED.value)
"""Alerts not cleared: what "open alerts" counts on the dashboard."""


def _counts() -> dict[str, int]:
    return {s.value: 0 for s in Status}


def _severities() -> dict[str, int]:
    return {s.value: 0 for s in Severity}


async def _open_alerts(db: Database) -> list[dict[str, Any]]:
    with db.activate():
        rows: list[dict[str, Any]] = await Alert.filter(state__in=OPEN_STATES).group_by(
            "site", "gateway", "device", "severity").annotate(n=Count("id")).values(
            "site", "gateway", "device", "severity", "n")
    return rows


async def fleet_summary(db: Database, rules: StatusConfig, now_ms: int) -> dict[str, Any]:
    """Sites → gateways → devices with liveness, status counts, open alerts by severity and backlog.

    Deliberately without a timestamp: two summaries of an unchanged fleet are equal, which is
    how the stream knows it has nothing to send.
    """
    gateways = await queries.list_gateways(db)
    devices = await queries.list_devices(db)
    anomalies = await queries.anomaly_states(db)
    alerts = await _open_alerts(db)

    totals: dict[str, Any] = {"devices": _counts(), "gateways": _counts(), "alerts": _severities(),
                              "backlog": 0}
    sites: dict[str, dict[str, Any]] = {}
    by_pk: dict[int, dict[str, Any]] = {}

    def site_of(name: str) -> dict[str, Any]:
        if name not in sites:
            sites[name] = {"name": name, "devices": _counts(), "gateways": _counts(), "alerts": _severities(),
                           "backlog": 0, "gateway_list": []}
        return sites[name]

    for g in gateways:
        status = gateway_status(g.state, g.last_seen_ms, now_ms, rules).value
        gw: dict[str, Any] = {"id": f"{g.site}.{g.name}", "name": g.name, "status": status,
              "state": g.state if g.state in ("online", "offline") else "unknown",
              "backlog": g.backlog, "readings_dropped": g.readings_dropped, "last_seen_ms": g.last_seen_ms,
              "devices": _counts(), "alerts": _severities(), "device_list": []}
        site = site_of(g.site)
        site["gateway_list"].append(gw)
        site["gateways"][status] += 1
        site["backlog"] += g.backlog
        totals["gateways"][status] += 1
        totals["backlog"] += g.backlog
        by_pk[g.pk] = gw
    by_id = {gw["id"]: gw for gw in by_pk.values()}
    device_alerts: dict[str, dict[str, int]] = {}
    for a in alerts:
        severity, n = a["severity"], int(a["n"])
        if severity not in totals["alerts"]:
            continue  # a severity this hub version does not know
        totals["alerts"][severity] += n
        if a["site"] in sites:
            sites[a["site"]]["alerts"][severity] += n
        if (gw_of := by_id.get(f"{a['site']}.{a['gateway']}")) is not None:
            gw_of["alerts"][severity] += n
        if a["device"]:
            device_alerts.setdefault(a["device"], _severities())[severity] += n
    for d in devices:
        owner = by_pk.get(d.gateway_pk)
        if owner is None:  # a device whose gateway row appeared between the two queries
            continue
        status = device_status(d.last_seen_ms, now_ms, rules).value
        anomaly = anomalies.get((d.gateway_pk, d.name))
        owner["device_list"].append({
            "id": d.uid, "name": d.name, "kind": d.kind, "profile": d.profile, "status": status,
            "last_seen_ms": d.last_seen_ms, "anomaly": bool(anomaly and anomaly.active),
            "alerts": device_alerts.get(d.uid, _severities())})
        owner["devices"][status] += 1
        sites[d.site]["devices"][status] += 1
        totals["devices"][status] += 1
    return {"totals": totals, "sites": [sites[name] for name in sorted(sites)]}

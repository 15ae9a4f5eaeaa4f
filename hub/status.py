"""Online / stale / offline rules for devices and gateways (see ``docs/hub.md``, "Status").

Pure functions of stored timestamps and the hub clock, evaluated when the API is asked, so the
status is always current without a background job rewriting rows.
"""

from __future__ import annotations

from enum import StrEnum

from hub.config import StatusConfig


class Status(StrEnum):
    """Liveness of a device or gateway as seen by the hub."""

    ONLINE = "online"
    STALE = "stale"
    OFFLINE = "offline"


def device_status(last_seen_ms: int | None, now_ms: int, rules: StatusConfig) -> Status:
    """``online`` if the newest reading is within ``stale_after_s``, ``stale`` if within
    ``offline_after_s``, else (or when no reading was ever stored) ``offline``."""
    if last_seen_ms is None:
        return Status.OFFLINE
    age_s = (now_ms - last_seen_ms) / 1000
    if age_s <= rules.stale_after_s:
        return Status.ONLINE
    if age_s <= rules.offline_after_s:
        return Status.STALE
    return Status.OFFLINE


def gateway_status(state: str, last_seen_ms: int | None, now_ms: int, rules: StatusConfig) -> Status:
    """Combine the gateway's own announcement with data freshness.

    ``offline`` when its retained status (or Last Will) says offline, or no telemetry arrived
    within ``offline_after_s``; ``online`` when it says online (or has not said anything yet)
    and telemetry arrived within ``stale_after_s``; ``stale`` otherwise.
    """
    if state == "offline":
        return Status.OFFLINE
    return device_status(last_seen_ms, now_ms, rules)

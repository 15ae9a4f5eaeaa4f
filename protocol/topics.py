"""MQTT topic layout: ``twin/v{N}/{site}/{gateway}/{channel}``.

The version sits in the topic as well as in the payload so that a broker ACL, a bridge or a
shared subscription can route by version without parsing JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protocol.ids import is_valid_name

ROOT = "twin"
Channel = Literal["telemetry", "status", "events", "models", "config", "commands"]
CHANNELS: tuple[Channel, ...] = ("telemetry", "status", "events", "models", "config", "commands")
UPLINK_CHANNELS: tuple[Channel, ...] = ("telemetry", "status", "events")
"""Channels a gateway publishes on; the broker ACL lets a gateway write these under its own prefix only."""
DOWNLINK_CHANNELS: tuple[Channel, ...] = ("models", "config", "commands")
"""Channels the hub publishes on, each to one gateway (``models`` and ``config`` retained); a gateway
may read only its own."""


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic."""

    version: int
    site: str
    gateway: str
    channel: Channel


def telemetry_topic(site: str, gateway: str, version: int = 1) -> str:
    """Topic a gateway publishes reading batches to."""
    return f"{ROOT}/v{version}/{site}/{gateway}/telemetry"


def status_topic(site: str, gateway: str, version: int = 1) -> str:
    """Topic of a gateway's retained online/offline status (and its Last Will)."""
    return f"{ROOT}/v{version}/{site}/{gateway}/status"


def events_topic(site: str, gateway: str, version: int = 1) -> str:
    """Topic of a gateway's events (buffer thinned, buffer corrupt, ...)."""
    return f"{ROOT}/v{version}/{site}/{gateway}/events"


def models_topic(site: str, gateway: str, version: int = 1) -> str:
    """Retained topic on which the hub tells one gateway which anomaly models to run."""
    return f"{ROOT}/v{version}/{site}/{gateway}/models"


def config_topic(site: str, gateway: str, version: int = 1) -> str:
    """Retained topic on which the hub sends one gateway its device configuration (remote config)."""
    return f"{ROOT}/v{version}/{site}/{gateway}/config"


def commands_topic(site: str, gateway: str, version: int = 1) -> str:
    """Topic on which the hub sends one gateway commands (setpoint writes); QoS 1, never retained."""
    return f"{ROOT}/v{version}/{site}/{gateway}/commands"


def channel_topic(channel: Channel, site: str, gateway: str, version: int = 1) -> str:
    """Topic of any channel of one gateway."""
    return f"{ROOT}/v{version}/{site}/{gateway}/{channel}"


def subscription(channel: Channel, version: int | None = None, share_group: str | None = None) -> str:
    """Subscription filter for one channel of every gateway.

    ``version=None`` matches every version (the hub dispatches on the payload's ``v``).
    ``share_group`` turns it into an MQTT 5 / Mosquitto shared subscription so that several
    hub processes split the load.
    """
    ver = "+" if version is None else f"v{version}"
    flt = f"{ROOT}/{ver}/+/+/{channel}"
    return f"$share/{share_group}/{flt}" if share_group else flt


def parse_topic(topic: str) -> Topic:
    """Parse a topic of this layout; raises ``ValueError`` naming what is wrong."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != ROOT:
        raise ValueError(f"topic {topic!r} is not of the form {ROOT}/v<N>/<site>/<gateway>/<channel>")
    _, ver, site, gateway, channel = parts
    if not (ver.startswith("v") and ver[1:].isdigit()):
        raise ValueError(f"topic {topic!r}: version segment {ver!r} is not v<N>")
    if not is_valid_name(site) or not is_valid_name(gateway):
        raise ValueError(f"topic {topic!r}: invalid site or gateway name")
    if channel not in CHANNELS:
        raise ValueError(f"topic {topic!r}: unknown channel {channel!r}")
    return Topic(int(ver[1:]), site, gateway, channel)  # type: ignore[arg-type,unused-ignore]

"""Identifiers for sites, gateways, devices and metrics.

Names travel inside MQTT topics and URLs, so they are restricted to a safe alphabet: no MQTT
wildcards (``+``, ``#``), no ``/`` and no ``.`` (the dot joins the parts of a device uid).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
_NAME_RE = re.compile(NAME_PATTERN)

# A pattern constraint (checked in pydantic's Rust core) rather than a Python validator: names
# are checked twice per reading at the hub, hundreds of thousands of times per second.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""A site, gateway, device or metric name: 1–64 chars of ``[A-Za-z0-9_-]``, not starting with ``-``/``_``."""


def is_valid_name(name: str) -> bool:
    """True when ``name`` may be used as a site, gateway, device or metric name."""
    return bool(_NAME_RE.match(name))


def device_uid(site: str, gateway: str, device: str) -> str:
    """The fleet-wide id of a device, ``site.gateway.device``; device names are only unique per gateway."""
    return f"{site}.{gateway}.{device}"


def split_device_uid(uid: str) -> tuple[str, str, str]:
    """Inverse of :func:`device_uid`; raises ``ValueError`` when ``uid`` is not of that form."""
    parts = uid.split(".")
    if len(parts) != 3 or not all(_NAME_RE.match(p) for p in parts):
        raise ValueError(f"not a device uid (site.gateway.device): {uid!r}")
    return parts[0], parts[1], parts[2]

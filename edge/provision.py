"""``twin-edge provision``: trade a one-time claim code for this gateway's identity (docs/edge.md).

The hub answers ``POST /api/v1/provision`` with the gateway's names, its broker login (a password
generated for it, sent only this once) and its device configuration. All of it goes into one
``edge.toml``, created with mode 0600 from the first byte (``os.open(..., 0o600)`` on a temp file,
then renamed), so the password is never readable by other users, not even briefly.

The claim code works once, so whatever the hub sent is written: device settings this gateway cannot
use (an unknown profile, say) are left out of the file with a warning, and the identity and the
login are still kept; the hub sends the configuration again over MQTT and hears the error back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge import __version__
from edge.config import load_config
from protocol.tomlconfig import ConfigError

CA_FILE_NAME = "mqtt-ca.pem"
"""Where the broker's CA certificate from the hub is written, beside the configuration."""
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class ProvisionError(Exception):
    """Provisioning failed; the message says why and what to do (no secret in it)."""


@dataclass(frozen=True)
class ProvisionResult:
    """What was written (for the command's summary; the password is not in it)."""

    path: Path
    site: str
    gateway: str
    broker: str
    username: str
    devices: int
    config_version: int | None
    warnings: list[str]


# -- TOML writing (the standard library reads TOML but does not write it) -------------------------


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value: strings as basic strings (JSON escapes are valid TOML), numbers,
    booleans, arrays and inline tables; ``ValueError`` for anything else (``None`` included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"number {value!r} has no TOML form here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def _table(header: str, values: dict[str, Any]) -> str:
    lines = [header] + [f"{_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def config_text(answer: dict[str, Any], hub_url: str, *, with_devices: bool = True,
                ca_file: str | None = None) -> str:
    """The ``edge.toml`` text for a provisioning answer."""
    gw, mqtt = answer["gateway"], answer["mqtt"]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = [
        f"# Written by `twin-edge provision` from {hub_url} at {stamp}.\n"
        "# Holds this gateway's broker password: keep it mode 0600, readable by the agent's user only.\n",
        _table("[gateway]", {"site": gw["site"], "name": gw["name"]}),
        _table("[mqtt]", {"host": mqtt["host"], "port": mqtt["port"], "client_id": gw["client_id"],
                          "username": mqtt["username"], "password": mqtt["password"],
                          "tls": True if mqtt.get("tls") else None, "ca_file": ca_file}),
    ]
    config = answer.get("config")
    if with_devices and config:
        parts.append(f"# Device configuration version {config['version']} from the hub; the hub may send newer ones.\n")
        parts += [_table("[[serial_ports]]", p) for p in config.get("serial_ports") or []]
        parts += [_table("[[devices]]", d) for d in config.get("devices") or []]
    return "\n".join(parts)


# -- talking to the hub ---------------------------------------------------------------------------


def _ssl_context(hub_url: str, ca_file: Path | None) -> ssl.SSLContext | None:
    if not hub_url.startswith("https://"):
        return None
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def request_identity(hub_url: str, code: str, *, ca_file: Path | None = None, timeout_s: float = 30.0) -> Any:
    """``POST {hub_url}/api/v1/provision``; the decoded answer, or :class:`ProvisionError`."""
    url = hub_url.rstrip("/") + "/api/v1/provision"
    body = json.dumps({"code": code}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json", "User-Agent": f"twin-edge/{__version__}"})
    try:
        ctx = _ssl_context(hub_url, ca_file)
        with urllib.request.urlopen(request, timeout=timeout_s, context=ctx) as resp:
            return json.loads(resp.read(1_000_000))
    except urllib.error.HTTPError as exc:
        detail = ""
        with contextlib.suppress(Exception):
            detail = str(json.loads(exc.read(10_000)).get("detail", ""))
        if exc.code in (403, 410):
            raise ProvisionError(f"the hub refused the claim code: {detail or exc.reason}") from None
        if exc.code == 429:
            raise ProvisionError(f"too many attempts from this address: {detail or exc.reason}") from None
        raise ProvisionError(f"the hub answered {exc.code} {exc.reason}: {detail}".rstrip(": ")) from None
    except urllib.error.URLError as exc:
        raise ProvisionError(f"cannot reach the hub at {hub_url}: {exc.reason}") from None
    except (OSError, ssl.SSLError) as exc:  # timeouts, resets, certificate problems after connect
        raise ProvisionError(f"cannot reach the hub at {hub_url}: {exc}") from None
    except ValueError as exc:  # bad URL, or an answer that is not JSON
        raise ProvisionError(f"unusable answer from {hub_url}: {exc}") from None


# -- writing the files ----------------------------------------------------------------------------


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically; the temp file is created with ``mode`` (never
    wider), so the content is never visible to other users, and fsynced before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen beyond `mode`
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check(answer: Any) -> dict[str, Any]:
    try:
        gw, mqtt = answer["gateway"], answer["mqtt"]
        for key in ("site", "name", "client_id"):
            if not isinstance(gw[key], str):
                raise TypeError(key)
        for key in ("host", "username", "password"):
            if not isinstance(mqtt[key], str):
                raise TypeError(key)
        if not isinstance(mqtt["port"], int):
            raise TypeError("port")
    except (KeyError, TypeError) as exc:
        raise ProvisionError(f"the hub's answer lacks {exc}; is the URL that of a twin hub?") from None
    return dict(answer)


def provision(hub_url: str, code: str, out: Path, *, force: bool = False, ca_file: Path | None = None,
              timeout_s: float = 30.0) -> ProvisionResult:
    """Claim this gateway's identity from the hub with ``code`` and write ``out`` (mode 0600).

    Refuses (before using the code) to replace an existing ``out`` unless ``force``."""
    if out.exists() and not force:
        raise ProvisionError(f"{out} exists already (this gateway has an identity); use --force to replace it")
    answer = _check(request_identity(hub_url, code, ca_file=ca_file, timeout_s=timeout_s))
    gw, mqtt = answer["gateway"], answer["mqtt"]
    warnings: list[str] = []
    ca_name = None
    if mqtt.get("tls") and mqtt.get("ca_pem"):
        write_private(out.parent / CA_FILE_NAME, str(mqtt["ca_pem"]), 0o644)  # a certificate is public
        ca_name = CA_FILE_NAME
    # Check the file as the agent will load it, in the same directory (profile paths are relative to it).
    probe = out.parent / f".{out.name}.check"
    try:
        text = config_text(answer, hub_url, ca_file=ca_name)
        write_private(probe, text)
        load_config(probe)
    except ConfigError as exc:
        warnings.append("the device configuration from the hub does not load here, so the file has no devices "
                        "(the agent reports the problem to the hub when it receives the configuration again): "
                        + "; ".join(p.replace(str(probe), str(out)) for p in exc.problems))
        text = config_text(answer, hub_url, with_devices=False, ca_file=ca_name)
    except ValueError as exc:  # a value with no TOML form
        warnings.append(f"the device configuration from the hub could not be written ({exc}); the file has no devices")
        text = config_text(answer, hub_url, with_devices=False, ca_file=ca_name)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    write_private(out, text)
    config = answer.get("config") if not warnings else None
    return ProvisionResult(out, gw["site"], gw["name"], f"{mqtt['host']}:{mqtt['port']}", mqtt["username"],
                           len(config.get("devices") or []) if config else 0,
                           config.get("version") if config else None, warnings)

"""Remote configuration: the device list the hub sends this gateway (``docs/remote-config.md``).

The hub publishes a retained :class:`~protocol.schema.GatewayConfigV1` on
``twin/v1/{site}/{gateway}/config``: a version number and the gateway's ``[[devices]]`` (and
optionally ``[[serial_ports]]``) tables as JSON, in the format of ``edge.toml``. For a version newer
than the one running, the agent

1. validates it completely (:func:`validate_document`): the same pydantic models and cross-checks
   as ``edge.toml`` (:mod:`edge.config`), every profile must exist and fit its device, every driver
   must be buildable. Any problem → a ``config_rejected`` event whose message names the device and
   key, and the running configuration stays exactly as it was;
2. applies it without a restart (:meth:`edge.agent.EdgeAgent.apply_devices`): only pollers of
   removed or changed devices are stopped, only new or changed ones started;
3. persists it atomically as ``remote-config.json`` beside the buffer file, so a restart runs it
   (:func:`load_persisted`); only then
4. reports ``config_applied`` with the version.

The retained message comes again on every reconnect: a version not newer than the applied one
(or the version last rejected) is ignored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from edge.config import EdgeConfig, IecDeviceConfig, RtuDeviceConfig, device_profiles
from edge.drivers.registry import build_drivers
from edge.inference.rollout import write_atomic
from edge.inference.scorer import EventSink
from protocol.ids import is_valid_name
from protocol.logs import get_logger
from protocol.profile import DeviceProfile
from protocol.schema import EventType, GatewayConfigV1, SchemaError, decode_gateway_config
from protocol.tomlconfig import format_loc, validation_problems

log = get_logger("edge.remote_config")

REMOTE_CONFIG_FILE = "remote-config.json"
REMOTE_KEYS = ("devices", "serial_ports")
"""The tables a remote configuration may set; everything else stays as in ``edge.toml``."""
MAX_ERROR_CHARS = 1000
"""An event's message is at most 1000 characters (``EventV1.message``)."""

Applier = Callable[[EdgeConfig, dict[str, DeviceProfile]], Awaitable[object]]


class RemoteConfigError(ValueError):
    """A remote configuration this gateway cannot run; ``problems`` name device and key each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def state_dir(cfg: EdgeConfig) -> Path:
    """The directory of the gateway's own state: beside the buffer file (like ``models/``)."""
    return cfg.buffer.path.parent


def remote_config_path(cfg: EdgeConfig) -> Path:
    """``remote-config.json`` beside the buffer file."""
    return state_dir(cfg) / REMOTE_CONFIG_FILE


def _where(document: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    """``devices[1] (boiler-2).port``: the key path, with the name of the device or port it is in."""
    text = format_loc(loc)
    if len(loc) >= 2 and loc[0] in REMOTE_KEYS and isinstance(loc[1], int):
        items = document.get(str(loc[0]))
        item = items[loc[1]] if isinstance(items, list) and 0 <= loc[1] < len(items) else None
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name:
            head = f"{loc[0]}[{loc[1]}] ({name!r})"
            return head + text[len(format_loc(loc[:2])):]
    return text


def _check_profile_ref(ref: object) -> str | None:
    """Why a profile reference from the hub is not allowed (``None``: fine). The hub names a
    built-in profile, or a ``.toml`` file under the gateway's state directory: it must not make the
    gateway read arbitrary files."""
    if not isinstance(ref, str):
        return None  # the model validation reports the type
    if ref.endswith(".toml"):
        p = PurePosixPath(ref)
        if p.is_absolute() or ".." in p.parts or "\\" in ref:
            return (f"profile file {ref!r} must be a relative path inside the gateway's state directory "
                    "(no '..', not absolute)")
        return None
    if not is_valid_name(ref):
        return f"{ref!r} is neither a built-in profile name nor a .toml file"
    return None


def validate_document(base: EdgeConfig, document: object) -> tuple[EdgeConfig, dict[str, DeviceProfile]]:
    """``base`` with its devices and serial ports replaced by those of ``document``, and the profile
    of every device; raises :class:`RemoteConfigError` listing every problem.

    Checks exactly what ``edge.toml`` is checked for (:class:`~edge.config.EdgeConfig` with
    ``extra="forbid"``, unique names, serial ports that exist, profiles that exist and fit) and
    builds (then closes) every driver, so what is accepted can run.
    """
    if not isinstance(document, dict):
        raise RemoteConfigError([f"config: must be a JSON object with {' and '.join(REMOTE_KEYS)}, "
                                 f"not {type(document).__name__}"])
    problems = [f"config.{k}: not settable remotely (only {', '.join(REMOTE_KEYS)})"
                for k in sorted(set(document) - set(REMOTE_KEYS))]
    if "devices" not in document:
        problems.append("config.devices: missing (send an empty list for a gateway without devices)")
    if problems:
        raise RemoteConfigError(problems)
    data = {**base.model_dump(exclude={"devices", "serial_ports"}),
            "devices": document["devices"], "serial_ports": document.get("serial_ports", [])}
    try:
        cfg = EdgeConfig.model_validate(data)
    except ValidationError as exc:
        raise RemoteConfigError([f"{_where(document, loc)}: {msg}" if loc else msg
                                 for loc, msg in validation_problems(data, exc)]) from None
    for i, dev in enumerate(cfg.devices):
        why = _check_profile_ref(dev.profile)
        if why:
            problems.append(f"{_where(document, ('devices', i, 'profile'))}: {why}")
    if problems:
        raise RemoteConfigError(problems)
    profiles, found = device_profiles(cfg.devices, base_dir=state_dir(base))
    problems = [f"{_where(document, loc)}: {msg}" for loc, msg in found]
    if problems:
        raise RemoteConfigError(problems)
    return cfg, profiles


async def check_drivers(cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> None:
    """Build every driver once and close it again (no connection is made); a device whose driver
    cannot be built is reported like any other invalid key."""
    problems = []
    for dev in cfg.devices:
        try:
            drivers = build_drivers(cfg, profiles, names=[dev.name])
        except Exception as exc:  # any library error: the device cannot run with these settings
            problems.append(f"device {dev.name!r}: driver cannot be built: {exc}")
            continue
        for d in drivers.values():
            await d.close()
    if problems:
        raise RemoteConfigError(problems)


def changed_devices(old: EdgeConfig, new: EdgeConfig, old_profiles: Mapping[str, DeviceProfile],
                    new_profiles: Mapping[str, DeviceProfile]) -> tuple[set[str], set[str], set[str]]:
    """(removed, changed, added) device names between two configurations. A device is changed when
    its table, its serial port's table or its resolved profile differs."""
    def port(cfg: EdgeConfig, name: str) -> object:
        d = next(x for x in cfg.devices if x.name == name)
        return cfg.serial_port(d.serial_port) if isinstance(d, RtuDeviceConfig | IecDeviceConfig) else None

    before = {d.name: d for d in old.devices}
    after = {d.name: d for d in new.devices}
    changed = {n for n in before.keys() & after.keys()
               if before[n] != after[n] or port(old, n) != port(new, n) or old_profiles[n] != new_profiles[n]}
    return set(before) - set(after), changed, set(after) - set(before)


def _document_of(cfg: EdgeConfig) -> dict[str, Any]:
    return {"devices": [d.model_dump(mode="json") for d in cfg.devices],
            "serial_ports": [p.model_dump(mode="json") for p in cfg.serial_ports]}


def load_persisted(base: EdgeConfig) -> tuple[EdgeConfig, dict[str, DeviceProfile], int] | None:
    """The remote configuration persisted by an earlier run, validated against ``base`` (the
    ``edge.toml`` it replaces the devices of): (config, profiles, version), or ``None`` when there is
    none or it is no longer valid (logged; the devices of ``edge.toml`` are used then)."""
    path = remote_config_path(base)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("remote_config_unreadable", path=str(path), error=str(exc), effect="using the devices of edge.toml")
        return None
    try:
        if not isinstance(raw, dict) or not isinstance(raw.get("version"), int) or raw["version"] < 1:
            raise RemoteConfigError(["not an object with a positive integer 'version'"])
        cfg, profiles = validate_document(base, raw.get("config"))
    except RemoteConfigError as exc:
        log.error("remote_config_invalid", path=str(path), problems=exc.problems,
                  effect="using the devices of edge.toml")
        return None
    return cfg, profiles, int(raw["version"])


def persist(cfg: EdgeConfig, document: Mapping[str, Any], version: int) -> None:
    """Write ``remote-config.json`` atomically (temp file, fsync, rename, fsync of the directory).
    Blocking: run it in a thread."""
    doc = {"v": 1, "version": version, "applied_ms": time.time_ns() // 1_000_000, "config": document}
    write_atomic(remote_config_path(cfg), (json.dumps(doc, indent=2) + "\n").encode())


class RemoteConfig:
    """Takes configuration messages from the uplink and applies new versions one at a time."""

    def __init__(self, base: EdgeConfig, running: tuple[EdgeConfig, dict[str, DeviceProfile]],
                 applied_version: int, apply: Applier, events: EventSink) -> None:
        self.base = base
        """The configuration from ``edge.toml`` (every section but the devices comes from it)."""
        self.running = running
        """The configuration running now and its profiles (restored if persisting a new one fails)."""
        self.site = base.gateway.site
        self.gateway = base.gateway.name
        self.applied_version = applied_version
        """Version running now (0: the devices of ``edge.toml``)."""
        self.rejected_version = 0
        self.last_error = ""
        self._apply = apply
        self.events = events
        self._latest: GatewayConfigV1 | None = None
        self._wake = asyncio.Event()
        self.processed = 0
        """Messages validated (applied or rejected); tests wait on it."""

    def handle(self, payload: bytes) -> None:
        """Take a message from the config topic (called by the uplink; returns at once)."""
        if not payload:
            log.info("remote_config_cleared", effect="keeping the running configuration",
                     version=self.applied_version)
            return
        try:
            msg = decode_gateway_config(payload, expect_version=1)
        except SchemaError as exc:
            log.error("remote_config_malformed", error=str(exc))
            return
        if (msg.site, msg.gateway) != (self.site, self.gateway):
            log.error("remote_config_misaddressed", site=msg.site, gateway=msg.gateway)
            return
        if msg.version <= self.applied_version or msg.version == self.rejected_version:
            # The retained message again after a reconnect, or an older one: nothing to do.
            log.debug("remote_config_unchanged", version=msg.version, applied=self.applied_version)
            return
        self._latest = msg
        self._wake.set()

    async def run(self) -> None:
        """Apply the newest message received, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            msg, self._latest = self._latest, None
            if msg is None or msg.version <= self.applied_version or msg.version == self.rejected_version:
                continue
            try:
                await self.process(msg)
            except Exception as exc:  # a bug here must not end remote configuration (nor the agent)
                log.exception("remote_config_failed", version=msg.version, error=repr(exc))

    async def process(self, msg: GatewayConfigV1) -> bool:
        """Validate, apply, persist and report one configuration; True if it runs now."""
        self.processed += 1
        try:
            cfg, profiles = validate_document(self.base, msg.config)
            await check_drivers(cfg, profiles)
        except RemoteConfigError as exc:
            await self._rejected(msg.version, exc.problems)
            return False
        previous = self.running
        result = await self._apply(cfg, profiles)
        try:
            await asyncio.to_thread(persist, self.base, _document_of(cfg), msg.version)
        except OSError as exc:
            # Running a configuration a restart would forget is worse than not running it.
            log.error("remote_config_not_persisted", path=str(remote_config_path(self.base)), error=str(exc))
            await self._apply(*previous)
            await self._rejected(msg.version, [f"cannot store {REMOTE_CONFIG_FILE}: {exc.strerror or exc}"])
            return False
        self.running = (cfg, profiles)
        self.applied_version = msg.version
        self.last_error = ""
        log.info("remote_config_applied", version=msg.version, devices=[d.name for d in cfg.devices],
                 changes=result)
        await self.events.add_event(EventType.CONFIG_APPLIED.value,
                                    f"configuration v{msg.version} applied: {len(cfg.devices)} device(s)",
                                    {"version": msg.version, "devices": len(cfg.devices)})
        return True

    async def _rejected(self, version: int, problems: list[str]) -> None:
        error = "; ".join(problems)
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 1] + "…"
        self.rejected_version = version
        self.last_error = error
        log.error("remote_config_rejected", version=version, problems=problems,
                  running_version=self.applied_version, effect="the running configuration is kept")
        await self.events.add_event(EventType.CONFIG_REJECTED.value, error,
                                    {"version": version, "error": error, "running_version": self.applied_version})

"""Alert rules as data: the ``[alerts]`` section of ``hub.toml`` (``docs/alerts.md``).

Every rule is one ``[[alerts.rules]]`` table with a ``type``:

* ``threshold`` — a metric below ``below`` or above ``above``;
* ``rate`` — a metric rising (or falling) faster than ``max_rise_per_min`` over ``window_s``;
* ``stale`` — a device that sent no reading for ``after_s`` seconds (checked on a timer);
* ``gateway_offline`` — a gateway whose status says offline, or silent for ``after_s``;
* ``gap`` — a hole of more than ``max_gap_s`` between two consecutive readings of a metric;
* ``anomaly`` — ``anomaly_started`` / ``anomaly_cleared`` events of the edge models;
* ``human_error`` — "possible human error" signals (rejected manual readings, unsafe setpoints).

Filters (``site``, ``gateway``, ``device``, ``kind``, ``profile``) narrow a rule to some devices;
unset means any. With ``builtin_rules = true`` (the default) the rules of :data:`BUILTIN_RULES`
(sensible for the simulator profiles) are added; a rule of the file with the same ``name``
replaces the built-in one, and ``disabled = ["name", ...]`` drops rules by name.

Validation errors name ``hub.toml:LINE: alerts.rules[2].below: ...`` like the rest of the file.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from protocol.ids import NAME_PATTERN

RuleName = Annotated[str, Field(pattern=NAME_PATTERN)]
NameFilter = Annotated[str, Field(pattern=NAME_PATTERN)] | None
Email = Annotated[str, Field(pattern=r"^[^@\s<>,;]+@[^@\s<>,;]+$", max_length=254)]


class Severity(StrEnum):
    """How bad it is; contacts choose the least severity they want to hear of."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 info, 1 warning, 2 critical."""
        return _RANK[self]


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Rule(_Strict):
    name: RuleName
    """Unique rule name; part of every condition key (``<name>:<device uid>``)."""
    severity: Severity = Severity.WARNING
    site: NameFilter = None
    gateway: NameFilter = None
    device: NameFilter = None
    """Device name (the last part of the uid)."""
    kind: NameFilter = None
    """Device kind: boiler, meter, tank."""
    profile: NameFilter = None
    """Device profile, e.g. sim-boiler."""
    auto_clear: bool = True
    """Clear the alert by itself when the condition is back to normal (else: by hand)."""

    def matches(self, site: str, gateway: str, device: str = "", kind: str = "", profile: str = "") -> bool:
        """True when every set filter equals the given value."""
        return ((self.site is None or self.site == site)
                and (self.gateway is None or self.gateway == gateway)
                and (self.device is None or self.device == device)
                and (self.kind is None or self.kind == kind)
                and (self.profile is None or self.profile == profile))


class ThresholdRule(_Rule):
    """``metric`` below ``below`` or above ``above`` (either or both)."""

    type: Literal["threshold"]
    metric: RuleName
    below: float | None = None
    above: float | None = None
    clear_margin: Annotated[float, Field(ge=0)] = 0.0
    """Hysteresis: back to normal only once ``clear_margin`` inside the limits."""

    @model_validator(mode="after")
    def _limits(self) -> ThresholdRule:
        if self.below is None and self.above is None:
            raise ValueError("a threshold rule needs 'below', 'above' or both")
        if self.below is not None and self.above is not None and self.below >= self.above:
            raise ValueError("'below' must be less than 'above'")
        return self

    def breached(self, value: float) -> bool:
        """Outside the limits."""
        return (self.below is not None and value < self.below) or (self.above is not None and value > self.above)

    def normal(self, value: float) -> bool:
        """Inside the limits by at least ``clear_margin`` (values in between keep the state)."""
        m = self.clear_margin
        return ((self.below is None or value >= self.below + m)
                and (self.above is None or value <= self.above - m))

    def describe(self, value: float, unit: str) -> str:
        """``pressure 0.62 bar below 0.8``."""
        if self.below is not None and value < self.below:
            return f"{self.metric} {value:g} {unit} below {self.below:g}".replace("  ", " ")
        if self.above is not None and value > self.above:
            return f"{self.metric} {value:g} {unit} above {self.above:g}".replace("  ", " ")
        return f"{self.metric} {value:g} {unit}".rstrip()


class RateRule(_Rule):
    """``metric`` changing faster than ``max_rise_per_min`` (units per minute) over ``window_s``.

    The rate is the slope between the oldest and the newest reading inside the window, and only
    computed once the readings span at least half the window. A negative ``max_rise_per_min``
    watches a fall instead (``-0.1`` bar/min: pressure dropping faster than 0.1 bar per minute).
    """

    type: Literal["rate"]
    metric: RuleName
    max_rise_per_min: float
    window_s: Annotated[float, Field(gt=0, le=86_400)] = 300

    @model_validator(mode="after")
    def _nonzero(self) -> RateRule:
        if self.max_rise_per_min == 0:
            raise ValueError("max_rise_per_min must not be 0")
        return self

    def breached(self, per_min: float) -> bool:
        """Rising (falling, for a negative limit) faster than the limit."""
        if self.max_rise_per_min > 0:
            return per_min > self.max_rise_per_min
        return per_min < self.max_rise_per_min


class StaleRule(_Rule):
    """A device with no reading for ``after_s`` seconds (hub clock; checked every ``evaluate_every_s``)."""

    type: Literal["stale"]
    after_s: Annotated[float, Field(gt=0)] = 600


def _only_filters(rule: _Rule, allowed: tuple[str, ...]) -> None:
    """Refuse filters a rule type cannot apply (they would silently match nothing)."""
    unusable = [f for f in ("site", "gateway", "device", "kind", "profile")
                if f not in allowed and getattr(rule, f) is not None]
    if unusable:
        raise ValueError(f"rules of type {getattr(rule, 'type', '')!r} can filter by {', '.join(allowed)} only, "
                         f"not by {', '.join(unusable)}")


class GatewayOfflineRule(_Rule):
    """A gateway whose status (or Last Will) says offline, or with no telemetry for ``after_s``."""

    type: Literal["gateway_offline"]
    after_s: Annotated[float, Field(gt=0)] = 600

    @model_validator(mode="after")
    def _filters(self) -> GatewayOfflineRule:
        _only_filters(self, ("site", "gateway"))
        return self


class GapRule(_Rule):
    """Two consecutive readings of ``metric`` (by timestamp) more than ``max_gap_s`` apart.

    A gap is found when data resumes; it does not go away by itself, so ``auto_clear`` defaults
    to false here."""

    type: Literal["gap"]
    metric: RuleName
    max_gap_s: Annotated[float, Field(gt=0)] = 300
    auto_clear: bool = False


class AnomalyRule(_Rule):
    """``anomaly_started`` of an edge model opens, ``anomaly_cleared`` clears (when ``auto_clear``)."""

    type: Literal["anomaly"]

    @model_validator(mode="after")
    def _filters(self) -> AnomalyRule:
        _only_filters(self, ("site", "gateway", "device"))
        return self


class HumanErrorRule(_Rule):
    """"Possible human error" signals (billing's rejected manual readings, unsafe setpoint writes).

    One condition per device (or site, or the hub when the signal names neither); a repeat counts
    on the open alert. Cleared by hand."""

    type: Literal["human_error"]
    auto_clear: bool = False

    @model_validator(mode="after")
    def _filters(self) -> HumanErrorRule:
        _only_filters(self, ("site", "gateway", "device"))
        return self


Rule = Annotated[ThresholdRule | RateRule | StaleRule | GatewayOfflineRule | GapRule | AnomalyRule | HumanErrorRule,
                 Field(discriminator="type")]
ReadingRule = ThresholdRule | RateRule | GapRule


class Contact(_Strict):
    """Someone to tell: by e-mail, by webhook, or both."""

    name: RuleName
    role: Literal["maintenance", "engineering", "operations"] = "maintenance"
    sites: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = []
    """Sites this contact looks after; empty: every site (and alerts that name no site)."""
    min_severity: Severity = Severity.WARNING
    email: list[Email] = []
    webhook: Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2000)] | None = None

    @model_validator(mode="after")
    def _reachable(self) -> Contact:
        if not self.email and self.webhook is None:
            raise ValueError("a contact needs 'email', 'webhook' or both")
        return self

    def wants(self, site: str, severity: Severity) -> bool:
        """True when an alert of ``site`` with ``severity`` is for this contact."""
        return severity.rank >= self.min_severity.rank and (not self.sites or site in self.sites)


class SmtpConfig(_Strict):
    """``[alerts.smtp]``: the mail server alert e-mails go through."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    sender: Email = "twin-hub@localhost"
    starttls: bool = False
    ssl: bool = False
    """Implicit TLS (SMTPS, usually port 465)."""
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0


class NotifyConfig(_Strict):
    """``[alerts.notify]``: when to notify, retry and rate limit."""

    on_open: bool = True
    on_retrigger: bool = True
    on_clear: bool = False
    max_per_window: Annotated[int, Field(ge=1, le=10_000)] = 3
    """At most this many notifications per contact and condition in ``window_s`` ..."""
    window_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = 3600
    """... the rest are counted and summed up in one digest once the window allows again."""
    retry_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    """Delivery attempts per message (the first one included)."""
    retry_base_s: Annotated[float, Field(gt=0, le=600)] = 2.0
    """Wait before the second attempt; doubles after each failure ..."""
    retry_max_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    """... up to this."""
    webhook_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_concurrent: Annotated[int, Field(ge=1, le=100)] = 8
    """Deliveries in flight at once."""


def _unique(what: str, names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate {what} name(s): {', '.join(dup)}")


class AlertsConfig(_Strict):
    """``[alerts]``."""

    enabled: bool = True
    builtin_rules: bool = True
    """Add :data:`BUILTIN_RULES` (a rule of the file with the same name replaces one)."""
    disabled: list[RuleName] = []
    """Names of rules (built-in or not) to leave out."""
    evaluate_every_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """Period of the timer that checks stale devices and offline gateways and sends digests."""
    queue_max_batches: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Committed batches waiting for evaluation; beyond this they are skipped (counted), never
    holding up ingest. Queued batches stay in memory (at most ``[ingest] batch_max_readings`` each)."""
    rules: list[Rule] = []
    contacts: list[Contact] = []
    smtp: SmtpConfig = SmtpConfig()
    notify: NotifyConfig = NotifyConfig()

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, rules: list[Rule]) -> list[Rule]:
        _unique("rule", [r.name for r in rules])
        return rules

    @field_validator("contacts")
    @classmethod
    def _unique_contacts(cls, contacts: list[Contact]) -> list[Contact]:
        _unique("contact", [c.name for c in contacts])
        return contacts

    def active_rules(self) -> list[Rule]:
        """The rules in force: built-ins (unless replaced or disabled) then the file's own."""
        own = {r.name for r in self.rules}
        builtin = [r for r in BUILTIN_RULES if r.name not in own] if self.builtin_rules else []
        return [r for r in [*builtin, *self.rules] if r.name not in self.disabled]


BUILTIN_RULES: list[Rule] = [
    ThresholdRule(type="threshold", name="boiler-pressure", profile="sim-boiler", metric="pressure",
                  below=0.8, above=2.8, clear_margin=0.05, severity=Severity.CRITICAL),
    ThresholdRule(type="threshold", name="boiler-flue-temp-high", profile="sim-boiler", metric="flue_temp",
                  above=110.0, clear_margin=5.0, severity=Severity.WARNING),
    RateRule(type="rate", name="boiler-flue-temp-rising", profile="sim-boiler", metric="flue_temp",
             max_rise_per_min=10.0, window_s=600, severity=Severity.WARNING),
    ThresholdRule(type="threshold", name="meter-voltage", profile="sim-meter", metric="voltage",
                  below=207.0, above=253.0, clear_margin=1.0, severity=Severity.WARNING),
    GapRule(type="gap", name="meter-energy-gap", kind="meter", metric="energy_import", max_gap_s=900,
            severity=Severity.INFO),
    StaleRule(type="stale", name="device-stale", after_s=600, severity=Severity.WARNING),
    GatewayOfflineRule(type="gateway_offline", name="gateway-offline", after_s=600, severity=Severity.CRITICAL),
    AnomalyRule(type="anomaly", name="edge-anomaly", severity=Severity.WARNING),
    HumanErrorRule(type="human_error", name="human-error", severity=Severity.WARNING),
]
"""Defaults for the simulator profiles (``docs/profiles.md``): boiler pressure 0.8–2.8 bar (the
simulated boiler locks out below 0.5 bar and is filled to ~1.5 bar), flue gas above 110 °C (lock-out
at 120 °C) or rising more than 10 K/min averaged over 10 minutes (a cold start rises about half as fast), mains
voltage outside 230 V ± 10 %, meter energy register silent for 15 minutes, devices and gateways
silent for 10 minutes, every edge anomaly, every human-error signal."""

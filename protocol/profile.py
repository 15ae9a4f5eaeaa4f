"""Device profiles: the register map of a device model, as a TOML file.

A profile is written once per device model (by us for the simulators, by a technician for a new
device) and reused by everything that talks to such a device: the simulators serve it, the edge
agent plans its requests and decodes with it. The format is documented in ``docs/profiles.md``.
"""

from __future__ import annotations

import itertools
import math
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.codec import DATA_TYPES, register_count
from protocol.ids import Name
from protocol.schema import DeviceKind
from protocol.tomlconfig import load_toml
from protocol.units import Unit

PROFILE_DIR = Path(__file__).with_name("profiles")

Table = Literal["holding", "input", "coil", "discrete"]
Order = Literal["big", "little"]
DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64",
                   "float32", "float64", "string", "bool"]
assert set(DataType.__args__) == DATA_TYPES  # type: ignore[attr-defined]


class Point(BaseModel):
    """One named value in a device's register map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    table: Table = "holding"
    address: Annotated[int, Field(ge=0, le=65535)]
    """0-based protocol address (register 40001 in a vendor manual is address 0 of 'holding')."""
    type: DataType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: Unit = ""
    length: Annotated[int, Field(ge=1, le=125)] | None = None
    """Registers occupied by a 'string' point."""
    bit: Annotated[int, Field(ge=0, le=15)] | None = None
    """For a 'bool' held in one bit of a register."""
    description: str = ""
    writable: bool = False
    min: float | None = None
    """Lowest value a write may set (the safe range; required when ``writable``)."""
    max: float | None = None
    """Highest value a write may set (the safe range; required when ``writable``)."""
    interval_s: Annotated[float, Field(ge=0.005, le=86_400)] | None = None
    """Poll this point at this interval instead of the device's ``poll_interval_s`` (counters
    that change slowly need not be read as often as temperatures)."""


    @model_validator(mode="after")
    def _check(self) -> Point:
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError("scale must be a finite non-zero number")
        if self.type == "string" and self.length is None:
            raise ValueError("a 'string' point needs 'length' (registers)")
        if self.type != "string" and self.length is not None:
            raise ValueError("'length' only applies to 'string' points")
        if self.bit is not None and self.type != "bool":
            raise ValueError("'bit' only applies to 'bool' points")
        if self.table in ("coil", "discrete") and self.type != "bool":
            raise ValueError(f"points in table {self.table!r} must be of type 'bool'")
        if self.writable and self.table in ("input", "discrete"):
            raise ValueError(f"a point in table {self.table!r} cannot be writable")
        if self.address + self.registers > 65536:
            raise ValueError("point runs past register 65535")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        if self.writable:
            self._check_safe_range()
        return self

    def _check_safe_range(self) -> None:
        # A setpoint write is checked against [min, max] at the hub and again at the gateway; a
        # writable point without a range would let any number through to the device.
        if self.min is None or self.max is None:
            raise ValueError(f"writable point {self.name!r} needs a safe range: set both 'min' and 'max'")
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError(f"writable point {self.name!r}: 'min' and 'max' must be finite numbers")
        if self.type == "string":
            raise ValueError(f"string point {self.name!r} cannot be writable (commands carry numbers)")
        if self.type == "bool":
            if self.bit is not None:
                # Writing one bit means read-modify-write of a register other points share.
                raise ValueError(f"bool point {self.name!r} kept in one bit cannot be writable")
            return
        if self.type in _INT_RAW_RANGE:
            lo, hi = _INT_RAW_RANGE[self.type]
            for bound in (self.min, self.max):
                raw = round((bound - self.offset) / self.scale)
                if not lo <= raw <= hi:
                    raise ValueError(f"writable point {self.name!r}: safe range bound {bound:g} does not fit "
                                     f"{self.type} (raw {raw}) with scale {self.scale:g} and offset {self.offset:g}")

    @cached_property
    def registers(self) -> int:
        """Number of 16-bit registers (or coils) the point occupies."""
        return register_count(self.type, self.length or 0)

    @cached_property
    def decimals(self) -> int:
        """Decimal places implied by the scale (0.1 → 1, 0.01 → 2, 0.25 → 2)."""
        return max(0, min(12, -math.floor(math.log10(abs(self.scale))) + (0 if _is_pow10(self.scale) else 1)))


_INT_RAW_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(1 << 15), (1 << 15) - 1), "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "uint32": (0, (1 << 32) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1), "uint64": (0, (1 << 64) - 1),
}
"""Raw register values each integer type can hold (a safe range must encode without wrapping)."""


def _is_pow10(x: float) -> bool:
    lg = math.log10(abs(x))
    return abs(lg - round(lg)) < 1e-9


class ObisPoint(BaseModel):
    """One value of an IEC 62056-21 data readout, identified by its OBIS code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: Annotated[str, Field(pattern=r"^[0-9A-Za-z]+(\.[0-9A-Za-z]+){1,5}(\*[0-9]+)?$")]
    """OBIS code as the meter prints it, e.g. ``1.8.0`` (total import energy) or ``0.0.0``."""
    name: Name
    type: Literal["number", "string"] = "number"
    unit: Unit = ""
    description: str = ""



class ProfileInfo(BaseModel):
    """The ``[profile]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    kind: DeviceKind
    version: Annotated[int, Field(ge=1)] = 1
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    max_registers_per_request: Annotated[int, Field(ge=1, le=125)] = 125
    """Largest read this device accepts (Modbus allows 125; some devices take fewer)."""
    max_gap: Annotated[int, Field(ge=0, le=124)] = 8
    """Unused registers a request may span to merge two neighbouring points into one read."""
    protocol: Literal["modbus", "iec62056-21"] = "modbus"
    """``modbus``: the profile lists register ``points``; ``iec62056-21``: it lists ``obis`` values."""


class DeviceProfile(BaseModel):
    """A whole profile file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: ProfileInfo
    points: list[Point] = []
    obis: list[ObisPoint] = []

    @model_validator(mode="after")
    def _points_match_protocol(self) -> DeviceProfile:
        if self.profile.protocol == "modbus" and (not self.points or self.obis):
            raise ValueError("a Modbus profile needs [[points]] and no [[obis]]")
        if self.profile.protocol == "iec62056-21" and (not self.obis or self.points):
            raise ValueError("an IEC 62056-21 profile needs [[obis]] and no [[points]]")
        names = [o.name for o in self.obis]
        codes = [o.code for o in self.obis]
        for what, items in (("name", names), ("code", codes)):
            dupes = sorted({x for x in items if items.count(x) > 1})
            if dupes:
                raise ValueError(f"obis {what}s used twice: {dupes}")
        return self

    @model_validator(mode="after")
    def _no_overlaps(self) -> DeviceProfile:
        seen: set[str] = set()
        spans: dict[str, list[tuple[int, int, str]]] = {}
        for p in self.points:
            if p.name in seen:
                raise ValueError(f"point name {p.name!r} is used twice")
            seen.add(p.name)
            spans.setdefault(p.table, []).append((p.address, p.address + p.registers, p.name))
        for table, items in spans.items():
            items.sort()
            for (_, end_a, a), (start_b, _, b) in itertools.pairwise(items):
                # Several bools may share one register (different bits); anything else may not overlap.
                if start_b < end_a and not (self.point(a).bit is not None and self.point(b).bit is not None):
                    raise ValueError(f"{table} points {a!r} and {b!r} overlap")
        return self

    def point(self, name: str) -> Point:
        """The point called ``name``; ``KeyError`` if there is none."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)

    def safe_range(self, name: str) -> tuple[float, float]:
        """``(min, max)`` a write to point ``name`` may set; ``KeyError`` if there is no such point,
        ``ValueError`` if it is not writable."""
        p = self.point(name)
        if not p.writable or p.min is None or p.max is None:
            raise ValueError(f"point {name!r} of profile {self.name!r} is not writable")
        return p.min, p.max

    @property
    def name(self) -> str:
        """Profile name, e.g. ``sim-boiler``."""
        return self.profile.name

    @property
    def units(self) -> dict[str, str]:
        """Unit of every metric this profile delivers."""
        if self.profile.protocol == "iec62056-21":
            return {o.name: o.unit for o in self.obis}
        return {p.name: p.unit for p in self.points}


def load_profile(path: str | Path) -> DeviceProfile:
    """Load and validate a profile file; raises ``protocol.tomlconfig.ConfigError``."""
    return load_toml(path, DeviceProfile)


def builtin_profile(name: str) -> DeviceProfile:
    """One of the profiles shipped in ``protocol/profiles/`` (e.g. ``sim-boiler``)."""
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
        raise FileNotFoundError(f"no built-in profile {name!r}; known: {known}")
    return load_profile(path)


def resolve_profile(ref: str, base_dir: Path | None = None) -> DeviceProfile:
    """A profile by built-in name, or by path (relative to ``base_dir``) when ``ref`` ends in .toml."""
    if ref.endswith(".toml"):
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return load_profile(path)
    return builtin_profile(ref)

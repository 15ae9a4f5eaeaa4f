"""Communication fault injection: damaged, missing and refused answers, drawn at seeded rates.

A spec ``[DEVICE:]kind=rate[,kind=rate...]`` gives, per request, the probability of each fault.
Every device has its own random streams, derived from the run's seed and the device's name, and
draws exactly one number per request it would answer, whatever the rates: a run is reproducible,
and one device's traffic never shifts another device's faults.

What each kind does (the transports apply them, see ``docs/simulators.md``):

============ ============================================================================
kind         effect
============ ============================================================================
crc          RTU: the CRC is corrupted. TCP: the MBAP protocol identifier is set to 0xFFFF
             (MBAP has no checksum; a frame that is not Modbus is what a client rejects).
             IEC: the data block's BCC is wrong.
timeout      no answer at all (the request is not executed)
exception    Modbus exception 4 (server device failure), request not executed; not IEC
garbage      random bytes, as many as the real answer, instead of the answer
short        the answer cut in the middle
disconnect   TCP: the connection is closed; RTU: the device falls silent for the dead time;
             not IEC
============ ============================================================================

For ``crc``, ``garbage`` and ``short`` the device executed the request (a write took effect) and
the answer was damaged on its way back; ``timeout``, ``exception`` and ``disconnect`` execute
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.logs import get_logger

log = get_logger("firmware_sim.inject")

FAULT_KINDS = ("crc", "timeout", "exception", "garbage", "short", "disconnect")
"""Every injectable fault, in the order a draw tests them."""
IEC_FAULT_KINDS = frozenset({"crc", "timeout", "garbage", "short"})
"""Faults that apply to an IEC 62056-21 meter."""
DAMAGING_FAULTS = frozenset({"crc", "garbage", "short"})
"""Faults that let the request execute and damage the answer on its way out."""

_STREAM = 0x1A7EC7  # keeps injection streams apart from the models' (seed, stream) sequences


@dataclass(frozen=True)
class InjectSpec:
    """One ``--inject`` option: fault rates for one device, or for all (``device`` None)."""

    device: str | None
    rates: Mapping[str, float] = field(default_factory=dict)


def parse_inject(text: str) -> InjectSpec:
    """Parse ``[DEVICE:]kind=rate[,kind=rate...]``; ``ValueError`` with a readable message."""
    device, colon, body = text.rpartition(":")
    if colon and not device.strip():
        raise ValueError(f"{text!r}: empty device name before ':'")
    rates: dict[str, float] = {}
    for item in body.split(","):
        kind, equals, value = item.partition("=")
        kind = kind.strip()
        if not equals or not kind:
            raise ValueError(f"{text!r} is not [DEVICE:]kind=rate[,kind=rate...] (e.g. boiler-1:crc=0.1)")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {', '.join(FAULT_KINDS)}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"rate of {kind} must be a number in [0, 1], got {value.strip()!r}") from None
        if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise ValueError(f"rate of {kind} must be in [0, 1], got {rate}")
        rates[kind] = rate
    return InjectSpec(device.strip() or None, rates)


def rates_for(specs: Sequence[InjectSpec], device: str, *, iec: bool = False) -> dict[str, float]:
    """The fault rates of ``device``: specs for every device, overridden by its own, in order.

    Kinds that do not apply to an IEC meter are dropped from the all-devices specs and refused in
    the device's own. ``ValueError`` if the rates add up to more than 1 (they are exclusive).
    """
    rates: dict[str, float] = {}
    for spec in specs:
        if spec.device is None:
            rates.update((k, r) for k, r in spec.rates.items() if not iec or k in IEC_FAULT_KINDS)
    for spec in specs:
        if spec.device == device:
            bad = sorted(k for k in spec.rates if iec and k not in IEC_FAULT_KINDS)
            if bad:
                raise ValueError(f"{device}: fault {bad[0]!r} does not apply to an IEC 62056-21 meter; "
                                 f"use {', '.join(sorted(IEC_FAULT_KINDS))}")
            rates.update(spec.rates)
    total = sum(rates.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"{device}: fault rates add up to {total:g} > 1 (each request gets at most one fault)")
    return {k: r for k, r in rates.items() if r > 0}


class FaultInjector:
    """Per-device fault decisions and the damaged answers, from seeded random streams."""

    def __init__(self, device: str, rates: Mapping[str, float], seed: int) -> None:
        self.device = device
        self.rates = {k: float(rates[k]) for k in FAULT_KINDS if rates.get(k, 0.0) > 0}
        decide, payload = np.random.SeedSequence([seed, _STREAM, *device.encode()]).spawn(2)
        # Decisions and garbage bytes come from separate streams, so the content of one garbage
        # answer never shifts later decisions.
        self._decide = np.random.Generator(np.random.PCG64(decide))
        self._payload = np.random.Generator(np.random.PCG64(payload))
        self.counts: dict[str, int] = {}
        """Faults injected so far, by kind."""

    def draw(self) -> str | None:
        """Decide the fault for one request (``None`` = answer normally); always one draw."""
        u = float(self._decide.random())
        edge = 0.0
        for kind, rate in self.rates.items():
            edge += rate
            if u < edge:
                return kind
        return None

    def record(self, kind: str, **context: object) -> None:
        """Count an injected fault and log it at DEBUG."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        log.debug("fault injected", device=self.device, fault=kind, count=self.counts[kind], **context)

    def injected(self) -> dict[str, int]:
        """Non-zero counts, for the truth log."""
        return {k: n for k, n in self.counts.items() if n}

    def garbage(self, n: int, *, seven_bit: bool = False) -> bytes:
        """``n`` random bytes (7-bit ASCII range for IEC lines)."""
        high = 128 if seven_bit else 256
        return bytes(int(b) for b in self._payload.integers(0, high, size=max(1, n)))

    @staticmethod
    def short(frame: bytes) -> bytes:
        """The first half of ``frame`` (at least one byte)."""
        return frame[: max(1, len(frame) // 2)]

    def damage_rtu(self, kind: str, frame: bytes) -> bytes:
        """The RTU frame as ``kind`` (crc, garbage or short) damages it."""
        if kind == "crc":
            return frame[:-2] + bytes(b ^ 0xFF for b in frame[-2:])
        if kind == "garbage":
            return self.garbage(len(frame))
        if kind == "short":
            return self.short(frame)
        raise ValueError(f"{kind!r} does not damage a frame")

    def damage_tcp(self, kind: str, frame: bytes) -> bytes:
        """The MBAP frame as ``kind`` (crc, garbage or short) damages it.

        ``crc``: MBAP has no checksum (TCP has its own), so the protocol identifier (bytes 2-3,
        always 0 for Modbus) is set to 0xFFFF. The frame keeps its length, so a client that reads
        header + length bytes stays in step, and rejects it as not Modbus.
        """
        if kind == "crc":
            return frame[:2] + b"\xff\xff" + frame[4:] if len(frame) >= 4 else frame
        if kind == "garbage":
            return self.garbage(len(frame))
        if kind == "short":
            return self.short(frame)
        raise ValueError(f"{kind!r} does not damage a frame")

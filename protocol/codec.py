"""Convert between engineering values and Modbus register words, per :mod:`protocol.profile`.

Modbus only defines 16-bit registers; how wider values are laid out differs between vendors.
``word_order`` says which 16-bit word comes first, ``byte_order`` the byte order inside each
word ("big" is the Modbus standard; "little" covers devices that swap bytes). Engineering value
= raw * scale + offset.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.profile import Point

# struct code and register count per numeric type
_NUMERIC: dict[str, tuple[str, int]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
DATA_TYPES = frozenset({*_NUMERIC, "string", "bool"})


class DecodeError(ValueError):
    """Register words that cannot represent a value of the point (wrong count, NaN, bad text)."""


def register_count(data_type: str, string_registers: int = 0) -> int:
    """Registers occupied by a value of ``data_type`` (strings: as declared)."""
    if data_type == "string":
        return string_registers
    if data_type == "bool":
        return 1
    return _NUMERIC[data_type][1]


def _to_bytes(words: list[int], byte_order: str, word_order: str) -> bytes:
    ordered = words if word_order == "big" else list(reversed(words))
    fmt = ">" if byte_order == "big" else "<"
    return b"".join(struct.pack(f"{fmt}H", w) for w in ordered)


def _from_bytes(raw: bytes, byte_order: str, word_order: str) -> list[int]:
    fmt = ">" if byte_order == "big" else "<"
    words = [struct.unpack(f"{fmt}H", raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
    return words if word_order == "big" else list(reversed(words))


def _shortest_float32(x: float) -> float:
    """The shortest decimal that is the same float32 (1.6420565, not 1.6420564651489258)."""
    packed = struct.pack(">f", x)
    for digits in range(6, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return x


def decode(point: Point, words: list[int]) -> float | int | bool | str:
    """Decode the register words of ``point`` into its engineering value."""
    if len(words) != point.registers:
        raise DecodeError(f"{point.name}: expected {point.registers} registers, got {len(words)}")
    if point.type == "bool":
        w = words[0]
        return bool((w >> point.bit) & 1) if point.bit is not None else w != 0
    raw_bytes = _to_bytes(words, point.byte_order, point.word_order)
    if point.type == "string":
        text = raw_bytes.split(b"\x00", 1)[0]
        try:
            return text.decode("ascii").rstrip()
        except UnicodeDecodeError:
            raise DecodeError(f"{point.name}: string registers are not ASCII: {raw_bytes!r}") from None
    code = _NUMERIC[point.type][0]
    raw: int | float = struct.unpack(f">{code}", raw_bytes)[0]
    if isinstance(raw, float) and not math.isfinite(raw):
        raise DecodeError(f"{point.name}: device sent a non-finite float ({raw})")
    if point.type == "float32":
        raw = _shortest_float32(raw)
    if point.scale == 1 and point.offset == 0:
        return raw
    value = raw * point.scale + point.offset
    # Round away binary noise (0.1 * 653 = 65.30000000000001) to the precision the scale implies.
    return round(value, point.decimals)


def encode(point: Point, value: float | int | bool | str) -> list[int]:
    """Encode an engineering value into register words (simulators and setpoint writes)."""
    if point.type == "bool":
        if point.bit is not None:
            return [(1 << point.bit) if value else 0]
        return [1 if value else 0]
    if point.type == "string":
        data = str(value).encode("ascii")[: point.registers * 2].ljust(point.registers * 2, b"\x00")
        return _from_bytes(data, point.byte_order, point.word_order)
    code = _NUMERIC[point.type][0]
    scaled = (float(value) - point.offset) / point.scale
    if point.type in INTEGER_TYPES:
        raw: int | float = round(scaled)
        bits = 16 * point.registers
        if point.type.startswith("u"):
            if raw < 0:
                raise OverflowError(f"{point.name}: {value} is negative for {point.type}")
            raw = int(raw) % (1 << bits)  # counters roll over like the real register does
        else:
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if not lo <= raw <= hi:
                raise OverflowError(f"{point.name}: {value} does not fit {point.type}")
    else:
        raw = scaled
    return _from_bytes(struct.pack(f">{code}", raw), point.byte_order, point.word_order)

"""Register decoding: every data type, byte and word order, scale/offset, rollover.

Expected words are written out by hand (not produced by ``encode``) so encode and decode
cannot agree on the same mistake.
"""

from __future__ import annotations

import pytest

from protocol import codec
from protocol.profile import Point


def pt(type_: str, **kw: object) -> Point:
    return Point(name="x", address=0, type=type_, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("type_", "words", "expected"), [
    ("uint16", [0xFFFF], 65535),
    ("int16", [0xFFFF], -1),
    ("int16", [0x8000], -32768),
    ("uint32", [0x0001, 0x0002], 65538),
    ("int32", [0xFFFF, 0xFFFE], -2),
    ("uint64", [0x0000, 0x0000, 0x0001, 0x0000], 65536),
    ("int64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], -1),
    ("float32", [0x4148, 0x0000], 12.5),
    ("float64", [0x4029, 0x0000, 0x0000, 0x0000], 12.5),
])
def test_decode_big_endian_types(type_: str, words: list[int], expected: object) -> None:
    assert codec.decode(pt(type_), words) == expected


def test_word_and_byte_order_variants_of_one_uint32() -> None:
    value = 0x11223344
    assert codec.decode(pt("uint32"), [0x1122, 0x3344]) == value  # ABCD
    assert codec.decode(pt("uint32", word_order="little"), [0x3344, 0x1122]) == value  # CDAB
    assert codec.decode(pt("uint32", byte_order="little"), [0x2211, 0x4433]) == value  # BADC
    assert codec.decode(pt("uint32", byte_order="little", word_order="little"), [0x4433, 0x2211]) == value  # DCBA


def test_float32_word_swapped() -> None:
    assert codec.decode(pt("float32", word_order="little"), [0x0000, 0x4148]) == 12.5


def test_scale_offset_and_rounding() -> None:
    p = pt("int16", scale=0.1, unit="degC")
    assert codec.decode(p, [653]) == 65.3  # not 65.30000000000001
    assert codec.decode(p, [0xFFF6]) == -1.0
    q = pt("uint16", scale=0.5, offset=-40.0, unit="degC")
    assert codec.decode(q, [100]) == 10.0
    assert codec.decode(pt("uint16", scale=0.001, unit="bar"), [1534]) == 1.534


def test_uint32_counter_rollover() -> None:
    energy = pt("uint32", scale=0.01, unit="kWh")
    assert codec.decode(energy, [0xFFFF, 0xFFFF]) == 42949672.95
    assert codec.decode(energy, [0x0000, 0x0000]) == 0.0
    # The simulator's counter wraps exactly like the device register does.
    assert codec.encode(energy, 42949672.95) == [0xFFFF, 0xFFFF]
    assert codec.encode(energy, 42949672.96) == [0x0000, 0x0000]
    assert codec.encode(energy, 42949673.07) == [0x0000, 0x000B]


def test_string_and_bool() -> None:
    s = pt("string", length=3)
    assert codec.decode(s, [0x5342, 0x2D32, 0x3400]) == "SB-24"
    assert codec.decode(pt("string", length=2, byte_order="little"), [0x4253, 0x3432]) == "SB24"
    assert codec.decode(pt("bool"), [0]) is False
    assert codec.decode(pt("bool"), [7]) is True
    assert codec.decode(pt("bool", bit=3), [0b1000]) is True
    assert codec.decode(pt("bool", bit=3), [0b0111]) is False


def test_decode_errors() -> None:
    with pytest.raises(codec.DecodeError, match="expected 2 registers"):
        codec.decode(pt("uint32"), [1])
    with pytest.raises(codec.DecodeError, match="non-finite"):
        codec.decode(pt("float32"), [0x7FC0, 0x0000])  # NaN
    with pytest.raises(codec.DecodeError, match="not ASCII"):
        codec.decode(pt("string", length=1), [0xFFFF])


def test_encode_round_trips_every_type() -> None:
    cases: list[tuple[Point, object]] = [
        (pt("int16", scale=0.1), -12.3), (pt("uint16"), 65535), (pt("int32"), -70000),
        (pt("uint32", word_order="little"), 4_000_000_000), (pt("int64", byte_order="little"), -(2**40)),
        (pt("uint64"), 2**63), (pt("float32"), 12.5), (pt("float64", word_order="little"), 1 / 3),
        (pt("string", length=4), "ABCDEFG"), (pt("bool", bit=15), True),
    ]
    for p, v in cases:
        assert codec.decode(p, codec.encode(p, v)) == v  # type: ignore[arg-type]


def test_encode_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(OverflowError):
        codec.encode(pt("int16"), 40000)
    with pytest.raises(OverflowError):
        codec.encode(pt("uint16", unit="bar"), -1)


def test_float32_decodes_to_its_shortest_decimal() -> None:
    p = pt("float32", unit="kW")
    assert codec.decode(p, [0x3FD2, 0x2EE8]) == 1.6420565  # not 1.6420564651489258
    assert codec.decode(p, codec.encode(p, 12.3)) == 12.3

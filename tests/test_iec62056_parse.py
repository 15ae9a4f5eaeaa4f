"""IEC 62056-21 data block parsing: BCC, data lines, units, malformed input."""

from __future__ import annotations

import pytest

from edge.drivers.iec62056 import (
    ETX,
    STX,
    ReadoutError,
    bcc,
    convert,
    parse_data_block,
    parse_identification,
)
from protocol.profile import ObisPoint, builtin_profile

BODY = (b"0.0.0(12345678)\r\n1.8.0(012345.678*kWh)\r\n16.7.0(01.234*kW)\r\n"
        b"32.7.0(229.8*V)\r\n13.7.0(0.95)\r\n!\r\n")


def frame(body: bytes = BODY) -> bytes:
    return STX + body + ETX + bytes([bcc(body + ETX)])


def test_bcc_is_xor_after_stx_including_etx() -> None:
    assert bcc(b"\x01\x02\x03") == 0
    assert bcc(b"A" + ETX) == 0x41 ^ 0x03
    # A known frame: STX "1.8.0(1*kWh)\r\n!\r\n" ETX, XOR computed by hand-written loop
    body = b"1.8.0(1*kWh)\r\n!\r\n" + ETX
    x = 0
    for b in body:
        x ^= b
    assert bcc(body) == x


def test_parse_data_block_lines_and_units() -> None:
    lines = parse_data_block(frame())
    assert lines == {"0.0.0": ("12345678", ""), "1.8.0": ("012345.678", "kWh"), "16.7.0": ("01.234", "kW"),
                     "32.7.0": ("229.8", "V"), "13.7.0": ("0.95", "")}


@pytest.mark.parametrize(("raw", "kind"), [
    (frame()[:-1], "short-frame"),                        # BCC missing
    (frame()[:20], "short-frame"),                        # cut in the middle
    (frame()[:-1] + bytes([frame()[-1] ^ 0x55]), "bcc"),  # corrupted BCC
    (frame(BODY.replace(b"1.8.0(", b"1.8.0[")), "garbage"),
    (frame(b"1.8.0(1*kWh)\r\n"), "short-frame"),           # no closing '!'
    (frame(b"\xff\xfe!\r\n"), "garbage"),
])
def test_malformed_blocks_are_refused_with_a_kind(raw: bytes, kind: str) -> None:
    with pytest.raises(ReadoutError) as err:
        parse_data_block(raw)
    assert err.value.kind == kind


def test_identification() -> None:
    assert parse_identification(b"/TWN5SM3-IEC\r\n") == ("5", "TWN5SM3-IEC")
    for bad in (b"TWN5\r\n", b"/TW\r\n", b"/TWNXabc\r\n", b"\x00\x01"):
        with pytest.raises(ReadoutError):
            parse_identification(bad)


def test_convert_to_profile_units() -> None:
    energy = ObisPoint(code="1.8.0", name="energy_import", unit="kWh")
    assert convert(energy, "012345.678", "kWh") == 12345.678
    assert convert(energy, "12345678", "Wh") == 12345.678
    power = ObisPoint(code="16.7.0", name="power", unit="kW")
    assert convert(power, "1234", "W") == 1.234
    with pytest.raises(ValueError, match="profile expects 'kWh'"):
        convert(energy, "1", "V")
    with pytest.raises(ValueError):
        convert(energy, "abc", "kWh")
    assert convert(ObisPoint(code="0.0.0", name="meter_id", type="string"), "0042", "") == "0042"


def test_shipped_iec_profile() -> None:
    p = builtin_profile("iec-meter")
    assert p.profile.protocol == "iec62056-21"
    assert {o.code: o.name for o in p.obis}["1.8.0"] == "energy_import"
    assert p.units["power"] == "kW"

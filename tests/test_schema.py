"""Message schema v1: what is accepted, what is refused and why, and topic layout."""

from __future__ import annotations

import json

import pytest

from protocol import topics
from protocol.schema import (
    CommandV1,
    GatewayConfigV1,
    GatewayState,
    Quality,
    SchemaError,
    StatusV1,
    TelemetryV1,
    decode_command,
    decode_gateway_config,
    decode_status,
    decode_telemetry,
    encode,
    encode_telemetry_v1,
)

DEVICES = {"boiler-1": ("boiler", "sim-boiler"), "meter-1": ("meter", "sim-meter")}
ROWS = [
    ("boiler-1", "flow_temp", 1, 1_764_000_000_000, 65.3, "degC", "good"),
    ("boiler-1", "burner_on", 2, 1_764_000_000_000, True, "", "good"),
    ("meter-1", "energy_import", 7, 1_764_000_000_500, 42949672.95, "kWh", "good"),
    ("meter-1", "power", 8, 1_764_000_000_500, None, "kW", "bad"),
]


def payload(**changes: object) -> bytes:
    doc = json.loads(encode_telemetry_v1("site-1", "gw-1", 1_764_000_001_000, DEVICES, ROWS, backlog=5))
    doc.update(changes)
    return json.dumps(doc).encode()


def test_fast_encoder_output_is_valid_v1() -> None:
    t = decode_telemetry(encode_telemetry_v1("site-1", "gw-1", 1, DEVICES, ROWS, 5), expect_version=1)
    assert isinstance(t, TelemetryV1)
    assert (t.site, t.gateway, t.backlog) == ("site-1", "gw-1", 5)
    assert [(r.device, r.metric, r.seq, r.value, r.quality) for r in t.readings] == [
        ("boiler-1", "flow_temp", 1, 65.3, Quality.GOOD),
        ("boiler-1", "burner_on", 2, True, Quality.GOOD),
        ("meter-1", "energy_import", 7, 42949672.95, Quality.GOOD),
        ("meter-1", "power", 8, None, Quality.BAD),
    ]
    assert t.devices["meter-1"].kind == "meter"


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"site": "x"}', "no integer 'v'"),
    (b'{"v": true}', "no integer 'v'"),
    (b'{"v": 99}', "unsupported schema version v=99"),
])
def test_refuses_unreadable_payloads(raw: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        decode_telemetry(raw)


def test_refuses_invalid_v1_content() -> None:
    with pytest.raises(SchemaError, match="readings"):
        decode_telemetry(payload(readings=[]))
    with pytest.raises(SchemaError, match="site"):
        decode_telemetry(payload(site="a/b"))
    with pytest.raises(SchemaError, match="missing from 'devices'"):
        decode_telemetry(payload(devices={"boiler-1": {"kind": "boiler"}}))
    bad = json.loads(payload())
    bad["readings"][0]["value"] = None  # good quality without a value
    with pytest.raises(SchemaError, match="must have a value"):
        decode_telemetry(json.dumps(bad).encode())
    bad = json.loads(payload())
    bad["readings"][0]["seq"] = -1
    with pytest.raises(SchemaError, match=r"readings\.0\.seq"):
        decode_telemetry(json.dumps(bad).encode())
    with pytest.raises(SchemaError, match="Extra inputs"):
        decode_telemetry(payload(surprise=1))


def test_topic_version_must_match_payload_version() -> None:
    with pytest.raises(SchemaError, match="does not match topic version v2"):
        decode_telemetry(payload(), expect_version=2)


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(SchemaError, match="exceeds"):
        decode_telemetry(b"{" + b" " * (5 * 1024 * 1024) + b"}")


def test_status_round_trip() -> None:
    st = StatusV1(site="site-1", gateway="gw-1", state=GatewayState.OFFLINE, ts=5, backlog=3)
    back = decode_status(encode(st), expect_version=1)
    assert back == st


def test_topics() -> None:
    assert topics.telemetry_topic("site-1", "gw-1") == "twin/v1/site-1/gw-1/telemetry"
    assert topics.status_topic("s", "g") == "twin/v1/s/g/status"
    assert topics.subscription("telemetry") == "twin/+/+/+/telemetry"
    assert topics.subscription("telemetry", 1, share_group="hubs") == "$share/hubs/twin/v1/+/+/telemetry"
    t = topics.parse_topic("twin/v1/site-1/gw-1/telemetry")
    assert (t.version, t.site, t.gateway, t.channel) == (1, "site-1", "gw-1", "telemetry")
    for bad in ("twin/v1/site/telemetry", "other/v1/s/g/telemetry", "twin/x1/s/g/telemetry",
                "twin/v1/s/g/orders", "twin/v1/s!/g/status"):
        with pytest.raises(ValueError):
            topics.parse_topic(bad)


def test_downlink_messages_round_trip() -> None:
    assert topics.config_topic("s", "g") == "twin/v1/s/g/config"
    assert topics.commands_topic("s", "g") == "twin/v1/s/g/commands"
    assert set(topics.UPLINK_CHANNELS) | set(topics.DOWNLINK_CHANNELS) == set(topics.CHANNELS)
    cmd = CommandV1(site="s", gateway="g", ts=1, id="c-1", expires=2, device="boiler-1", point="flow_setpoint",
                    value=70.5, issued_by="tech")
    assert decode_command(encode(cmd)) == cmd
    with pytest.raises(SchemaError, match="id"):
        decode_command(encode(cmd).replace(b'"c-1"', b'"c 1"'))
    cfg = GatewayConfigV1(site="s", gateway="g", ts=1, version=3, config={"devices": []})
    assert decode_gateway_config(encode(cfg)).version == 3
    with pytest.raises(SchemaError, match="version"):
        decode_gateway_config(encode(cfg).replace(b'"version":3', b'"version":0'))

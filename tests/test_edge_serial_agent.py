"""The edge agent (``twin-edge run``) on serial lines: two Modbus RTU devices sharing one bus and
an IEC 62056-21 meter on its own port, all simulated on ptys, forwarded to a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt

from fleet.broker import Mosquitto
from fleet.procs import ReadyProcess
from protocol.schema import decode_telemetry


def edge_toml(tmp_path: Path, broker_port: int, devices: list[dict[str, Any]]) -> Path:
    rtu = next(d for d in devices if d["transport"] == "rtu")
    iec = next(d for d in devices if d["transport"] == "iec62056")
    # Linux ptys refuse 8E1 (tcsetattr EINVAL): the gateway opens them 8N1; the simulator still
    # times the wire as the 8E1 line it announces.
    text = f"""
[gateway]
site = "site-s"
name = "gw-serial"

[mqtt]
port = {broker_port}
batch_max_delay_ms = 50

[buffer]
path = "buf.db"

[metrics]
port = 0

[[serial_ports]]
name = "rs485"
device = "{rtu['serial']}"
baudrate = {rtu['baudrate']}
parity = "N"

[[serial_ports]]
name = "optical"
device = "{iec['serial']}"
baudrate = 9600
timeout_s = 1.0
"""
    for d in devices:
        if d["transport"] == "rtu":
            text += (f'\n[[devices]]\nname = "{d["name"]}"\ntransport = "rtu"\nserial_port = "rs485"\n'
                     f'unit_id = {d["unit_id"]}\nprofile = "{d["profile"]}"\npoll_interval_s = 0.3\n')
        else:
            text += (f'\n[[devices]]\nname = "{d["name"]}"\ntransport = "iec62056"\nserial_port = "optical"\n'
                     f'poll_interval_s = 1.0\n')
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


async def test_agent_reads_rtu_bus_and_iec_meter(mosquitto: Mosquitto, tmp_path: Path) -> None:
    truth_path = tmp_path / "truth.jsonl"
    sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--rtu", "--boilers", "1", "--meters", "1",
                              "--iec-meters", "1", "--speed", "0", "--truth-log", str(truth_path),
                              log_path=tmp_path / "sim.log").start()
    edge = None
    try:
        devices = sim.ready["devices"]
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-serial") as sub:
            await sub.subscribe("twin/v1/site-s/gw-serial/telemetry", qos=1)
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config",
                                       str(edge_toml(tmp_path, mosquitto.port, devices)),
                                       log_path=tmp_path / "edge.log").start()
            got: dict[str, list[Any]] = {}

            async def collect() -> None:
                async for msg in sub.messages:
                    for r in decode_telemetry(msg.payload).readings:  # type: ignore[arg-type]
                        got.setdefault(r.device, []).append(r)
                    if len(got.get("iec-meter-1", [])) >= 20 and len(got.get("meter-1", [])) >= 30:
                        return
            await asyncio.wait_for(collect(), 20)
    finally:
        if edge is not None:
            edge.stop()
        sim.stop()
    truth: dict[str, dict[str, Any]] = {}
    for line in truth_path.read_text().splitlines():
        rec = json.loads(line)
        truth[rec["device"]] = rec["values"]  # clock stopped: one snapshot per device
    assert set(got) == {"boiler-1", "meter-1", "iec-meter-1"}
    for device, readings in got.items():
        bad = [r for r in readings if r.quality != "good"]
        assert not bad, bad[:3]
        for r in readings:
            assert r.value == truth[device][r.metric], (device, r.metric, r.value, truth[device][r.metric])
    iec_metrics = {r.metric for r in got["iec-meter-1"]}
    assert {"energy_import", "power", "voltage", "meter_id", "clock_time"} <= iec_metrics

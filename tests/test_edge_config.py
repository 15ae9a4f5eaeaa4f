"""Edge configuration and device profiles: good files load, bad files say where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.cli import main as edge_cli
from edge.config import load_config
from protocol.profile import load_profile
from protocol.tomlconfig import ConfigError

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
[gateway]
site = "site-1"
name = "gw-1"

[[devices]]
name = "boiler-1"
profile = "sim-boiler"
host = "127.0.0.1"
port = 5020
"""


def write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def test_example_file_loads_with_all_devices() -> None:
    cfg, profiles = load_config(ROOT / "examples" / "edge.toml")
    assert [d.name for d in cfg.devices] == ["boiler-1", "boiler-2", "meter-1", "meter-2"]
    assert profiles["meter-1"].profile.kind == "meter"
    assert cfg.client_id == "twin-edge-site-1-gw-1"
    assert cfg.buffer.path == ROOT / "examples" / ".." / "var" / "edge-buffer.db"


def test_defaults(tmp_path: Path) -> None:
    cfg, _ = load_config(write(tmp_path, GOOD))
    assert (cfg.mqtt.port, cfg.buffer.synchronous, cfg.devices[0].unit_id) == (1883, "FULL", 1)
    assert cfg.buffer.path == tmp_path / "var" / "edge-buffer.db"


@pytest.mark.parametrize(("change", "expected"), [
    (("port = 5020", 'port = "abc"'), ":9: devices[0].port: Input should be a valid integer"),
    (("port = 5020", "port = 70000"), ":9: devices[0].port: Input should be less than or equal to 65535"),
    (('name = "gw-1"', 'name = "gw 1"'), ":3: gateway.name: 'gw 1' is not a valid name"),
    (('host = "127.0.0.1"', 'host = "127.0.0.1"\ncolour = "red"'), ":9: devices[0].colour: Extra inputs"),
    (('name = "gw-1"\n', ""), ":1: gateway.name: Field required"),
    (('profile = "sim-boiler"', 'profile = "no-such"'), ":7: devices[0].profile: no built-in profile 'no-such'"),
])
def test_errors_name_line_and_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}{expected}" in str(err.value)


def test_duplicate_device_names_and_unknown_points(tmp_path: Path) -> None:
    twice = GOOD + GOOD.split("\n", 4)[4]
    with pytest.raises(ConfigError, match="repeated: \\['boiler-1'\\]"):
        load_config(write(tmp_path, twice))
    with pytest.raises(ConfigError, match=r":10: devices\[0\]\.points: not in profile 'sim-boiler': \['nope'\]"):
        load_config(write(tmp_path, GOOD + 'points = ["flow_temp", "nope"]\n'))


def test_toml_syntax_error_reports_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TOML syntax error: .*line 2"):
        load_config(write(tmp_path, "[gateway]\nsite = \n"))


def test_cli_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert edge_cli(["check-config", "--config", str(write(tmp_path, GOOD))]) == 0
    assert edge_cli(["check-config", "--config", str(write(tmp_path, GOOD.replace("5020", "-1"), "b.toml"))]) == 2
    err = capsys.readouterr().err
    assert "b.toml:9: devices[0].port" in err


def test_profile_file_errors(tmp_path: Path) -> None:
    base = '[profile]\nname = "dev"\nkind = "boiler"\n\n[[points]]\nname = "a"\naddress = 0\ntype = "uint32"\n'
    load_profile(write(tmp_path, base, "ok.toml"))
    overlap = base + '\n[[points]]\nname = "b"\naddress = 1\n'
    with pytest.raises(ConfigError, match="points 'a' and 'b' overlap"):
        load_profile(write(tmp_path, overlap, "overlap.toml"))
    with pytest.raises(ConfigError, match=r":9: points\[0\]\.unit: .*unknown unit 'furlong'"):
        load_profile(write(tmp_path, base + 'unit = "furlong"\n', "unit.toml"))
    with pytest.raises(ConfigError, match="'string' point needs 'length'"):
        load_profile(write(tmp_path, base.replace('"uint32"', '"string"'), "str.toml"))


def test_agent_start_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    cfg = write(tmp_path, GOOD.replace("[[devices]]", f"[metrics]\nport = {port}\n\n[[devices]]"))
    try:
        assert edge_cli(["run", "--config", str(cfg)]) == 1
    finally:
        taken.close()
    assert f"metrics exporter cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    cfg = write(tmp_path, GOOD.replace("[[devices]]", f'[buffer]\npath = "{blocked}/buf.db"\n\n[[devices]]'), "b.toml")
    assert edge_cli(["run", "--config", str(cfg)]) == 1
    assert "cannot open the buffer" in capsys.readouterr().err


SERIAL = """\
[gateway]
site = "site-1"
name = "gw-1"

[[serial_ports]]
name = "rs485-1"
device = "/dev/ttyUSB0"
baudrate = 9600
parity = "N"
stopbits = 2

[[serial_ports]]
name = "optical-1"
device = "/dev/ttyUSB1"
baudrate = 9600

[[devices]]
name = "boiler-1"
transport = "rtu"
serial_port = "rs485-1"
unit_id = 1
profile = "sim-boiler"

[[devices]]
name = "boiler-2"
transport = "rtu"
serial_port = "rs485-1"
unit_id = 2
profile = "sim-boiler"

[[devices]]
name = "meter-1"
transport = "iec62056"
serial_port = "optical-1"
"""


def test_serial_devices(tmp_path: Path) -> None:
    cfg, profiles = load_config(write(tmp_path, SERIAL))
    port = cfg.serial_port("rs485-1")
    assert port.char_bits == 11  # start + 8 data + no parity + 2 stop
    assert port.inter_frame_s == pytest.approx(3.5 * 11 / 9600)
    assert cfg.serial_port("optical-1").inter_frame_s == pytest.approx(3.5 * 11 / 9600)
    assert profiles["meter-1"].name == "iec-meter"
    assert cfg.devices[2].poll_interval_s == 60.0
    fast = write(tmp_path, SERIAL.replace("baudrate = 9600\nparity", "baudrate = 115200\nparity"), "fast.toml")
    assert load_config(fast)[0].serial_port("rs485-1").inter_frame_s == 0.00175


@pytest.mark.parametrize(("change", "message"), [
    (('serial_port = "rs485-1"\nunit_id = 2', 'serial_port = "rs485-1"\nunit_id = 1'),
     "unit ids used twice on one bus: [1]"),
    (('serial_port = "optical-1"', 'serial_port = "nope"'), "no [[serial_ports]] entry named 'nope'"),
    (('name = "boiler-2"\ntransport = "rtu"\nserial_port = "rs485-1"',
      'name = "boiler-2"\ntransport = "rtu"\nserial_port = "optical-1"'),
     "cannot carry both Modbus RTU and IEC 62056-21"),
    (('transport = "iec62056"', 'transport = "iec62056"\nprofile = "sim-meter"'),
     "profile 'sim-meter' is for modbus, transport 'iec62056' needs a iec62056-21 profile"),
    (('transport = "iec62056"', 'transport = "carrier-pigeon"'), "transport must be 'tcp', 'rtu' or 'iec62056'"),
    (("parity = \"N\"", "parity = \"X\""), ":9: serial_ports[0].parity: Input should be 'N', 'E' or 'O'"),
    (("unit_id = 2", "unit_id = 248"), ":28: devices[1].unit_id: Input should be less than or equal to 247"),
])
def test_serial_config_errors(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, SERIAL.replace(*change)))
    assert message in str(err.value)


def test_commented_serial_example_is_valid(tmp_path: Path) -> None:
    import re

    text = (ROOT / "examples" / "edge.toml").read_text()
    uncommented = re.sub(r"(?m)^# (\[\[|[a-z_]+ = )", r"\1", text)
    path = write(tmp_path, uncommented)
    cfg, profiles = load_config(path)
    assert [d.transport for d in cfg.devices][-2:] == ["rtu", "iec62056"]
    assert profiles["main-meter"].profile.protocol == "iec62056-21"

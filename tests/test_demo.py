"""``make demo`` as a user runs it: the fleet comes up, data reaches the API, and SIGTERM to
the process group stops every process within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psutil

from fleet.broker import find_mosquitto
from fleet.net import free_port, free_port_block
from tests.hubtools import BearerAuth

ROOT = Path(__file__).resolve().parents[1]


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def anonymous_mqtt_refused(port: int) -> bool:
    """True when the broker answers an anonymous CONNECT with a refusal."""
    answers: list[Any] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-test-anonymous")
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return bool(answers) and answers[0].is_failure


def test_demo_runs_fleet_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    find_mosquitto()  # a missing broker is a setup failure, not a demo failure
    # Ports taken from one block: the four simulators listen on sim_port..sim_port+3.
    sim_port = free_port_block(4)
    others: list[int] = []
    for _ in range(50):
        port = free_port()
        if not sim_port <= port < sim_port + 4 and port not in others:
            others.append(port)
        if len(others) == 3:
            break
    hub_port, mqtt_port, metrics_port = others
    # No TWIN_ADMIN_PASSWORD: the demo makes one, keeps it in its workdir and prints it.
    inherited = {k: v for k, v in os.environ.items() if k != "TWIN_ADMIN_PASSWORD"}
    env = {**inherited, "HUB_PORT": str(hub_port), "MQTT_PORT": str(mqtt_port), "SIM_BASE_PORT": str(sim_port),
           "EDGE_METRICS_PORT": str(metrics_port)}
    out = open(tmp_path / "demo.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "fleet.demo", "--workdir", str(tmp_path / "demo")],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid
    try:
        api = f"http://127.0.0.1:{hub_port}"
        deadline = time.monotonic() + 60
        devices: list[dict[str, object]] = []
        auth: BearerAuth | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            password_file = tmp_path / "demo" / "admin-password"
            if auth is None and password_file.exists():
                auth = BearerAuth("admin", password_file.read_text().strip())
            try:
                if auth is None:
                    raise httpx.ConnectError("no admin password yet")
                devices = httpx.get(f"{api}/api/v1/devices", timeout=2, auth=auth).json()
                if len(devices) == 4 and all(d["last_seen"] for d in devices):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        printed = (tmp_path / "demo.out").read_text()
        assert f"Hub API:   {api}/api/v1/devices" in printed, printed
        assert auth is not None and f"sign in as 'admin' with password {auth.password}" in printed
        assert oct((tmp_path / "demo" / "admin-password").stat().st_mode & 0o777) == "0o600"
        assert httpx.get(f"{api}/api/v1/devices", timeout=5).status_code == 401  # nothing without signing in
        # The gateway was provisioned with a claim code; its login file is private; the broker
        # refuses anonymous clients.
        assert "gateway    site-1.gw-1 created at the hub and provisioned with a one-time claim code" in printed
        edge_toml = tmp_path / "demo" / "edge.toml"
        assert oct(edge_toml.stat().st_mode & 0o777) == "0o600" and 'username = "site-1.gw-1"' in edge_toml.read_text()
        assert anonymous_mqtt_refused(mqtt_port)
        assert sorted(d["id"] for d in devices) == [
            "site-1.gw-1.boiler-1", "site-1.gw-1.boiler-2", "site-1.gw-1.meter-1", "site-1.gw-1.meter-2"]
        latest = httpx.get(f"{api}/api/v1/devices/site-1.gw-1.boiler-1/latest", timeout=5, auth=auth).json()
        assert 0.5 < latest["metrics"]["pressure"]["value"] < 3.0
        assert len(group_members(pgid)) >= 5  # demo, broker, simulators, hub, edge
        edge_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "twin_edge_published_readings_total" in edge_metrics
        # The dashboard is on the hub's port, and the meters have a tariff, so it shows cost.
        assert f"Dashboard: {api}/" in printed
        login = httpx.get(f"{api}/", timeout=5, follow_redirects=True)
        assert login.status_code == 200 and '<label for="username">' in login.text
        assert "billing    site-1's meters on tariff demo-economy7" in printed
        month = time.strftime("%Y-%m-01T00:00:00Z", time.gmtime())
        cost = httpx.get(f"{api}/api/v1/meters/site-1.gw-1.meter-1/cost", params={"since": month}, timeout=5,
                         auth=auth).json()
        assert {line["tariff"] for line in cost["energy"]} == {"demo-economy7"}, cost
        assert cost["unpriced_kwh"] == "0.000" and float(cost["total"]) > 0, cost

        t0 = time.monotonic()
        os.killpg(pgid, signal.SIGTERM)
        while group_members(pgid) and time.monotonic() - t0 < 12:
            time.sleep(0.1)
        stopped_after = time.monotonic() - t0
        assert not group_members(pgid), [p.cmdline() for p in group_members(pgid)]
        assert stopped_after < 10, f"demo took {stopped_after:.1f} s to stop"
        assert proc.wait(1) == 0
        assert "demo: stopped" in (tmp_path / "demo.out").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()
        out.close()

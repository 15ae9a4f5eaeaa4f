"""``make demo``: a whole local fleet on one machine.

2 simulated boilers + 2 meters (Modbus TCP) → one edge agent → a private Mosquitto → the hub
(SQLite) with its REST API. Secured as in production (TLS aside): the hub's ``admin`` user
(``TWIN_ADMIN_PASSWORD``, or a random password kept in the demo directory and printed), a broker
that refuses anonymous clients and gives each gateway its own login and topics, and a gateway
provisioned with a one-time claim code. The shipped anomaly models (``models/shipped``) are uploaded to the
hub's registry and assigned fleet-wide, as staff would do it, so the gateway downloads them and
scores live. ``--fault boiler-2:leak=0.5`` injects a process fault into a simulator.
Ctrl-C, or SIGTERM to the process group, stops everything within
10 s. Ports: ``HUB_PORT`` (default 8000), ``MQTT_PORT`` (1883), ``SIM_BASE_PORT`` (5020),
``EDGE_METRICS_PORT`` (9108).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fleet.broker import BrokerAuth, BrokerUnavailable, Mosquitto
from fleet.configs import device_tables, shipped_models, write_hub_config
from fleet.hubapi import HttpRefused, http_json, sign_in
from fleet.net import port_open
from fleet.procs import ProcessFailed, ReadyProcess

STOP_WITHIN_S = 10.0


def _port(env: str, default: int) -> int:
    raw = os.environ.get(env, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        sys.exit(f"demo: {env}={raw!r} is not a TCP port")
    return int(raw)


def main(argv: list[str] | None = None) -> int:
    """Start the fleet, print where to look, and wait for Ctrl-C / SIGTERM."""
    ap = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workdir", type=Path, default=Path("var/demo"), help="configs, logs and databases")
    ap.add_argument("--boilers", type=int, default=2)
    ap.add_argument("--meters", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls of each device")
    ap.add_argument("--fault", action="append", default=[], metavar="DEVICE:KEY=VALUE",
                    help="process fault for a simulator, e.g. boiler-2:leak=0.5 (see docs/simulators.md)")
    ap.add_argument("--no-models", action="store_true", help="do not roll out the shipped anomaly models")
    args = ap.parse_args(argv)

    hub_port, mqtt_port, sim_port = _port("HUB_PORT", 8000), _port("MQTT_PORT", 1883), _port("SIM_BASE_PORT", 5020)
    for what, port in (("HUB_PORT", hub_port), ("MQTT_PORT", mqtt_port)):
        if port_open("127.0.0.1", port):
            print(f"demo: port {port} ({what}) is already in use; choose another, e.g. {what}={port + 1} make demo",
                  file=sys.stderr)
            return 2

    work = args.workdir.resolve()
    logs = work / "logs"
    work.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # A secured broker as in production: no anonymous clients, one login per gateway and an ACL,
    # both files written by the hub (docs/security.md); TLS is left out of the local demo.
    broker_dir = work / "mosquitto"
    broker = Mosquitto(port=mqtt_port, workdir=broker_dir,
                       auth=BrokerAuth(password_file=broker_dir / "passwd", acl_file=broker_dir / "acl"))
    children: list[ReadyProcess] = []
    try:
        broker.start()
        print(f"broker     mqtt://127.0.0.1:{mqtt_port}  (mosquitto, log {broker.log_path})", flush=True)
        sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", str(args.boilers),
                                  "--meters", str(args.meters), "--base-port", str(sim_port),
                                  "--seed", str(args.seed), *(a for f in args.fault for a in ("--fault", f)),
                                  log_path=logs / "sim.log")
        children.append(sim.start())
        devices = sim.ready["devices"]
        print(f"simulators {len(devices)} devices on 127.0.0.1:{sim_port}-{sim_port + len(devices) - 1}", flush=True)

        admin_password = _admin_password(work)
        hub_cfg = write_hub_config(
            work / "hub.toml", database_url=f"sqlite://{work / 'hub.db'}", mqtt_port=mqtt_port, http_port=hub_port,
            mqtt={"username": "twin-hub", "password": _kept_secret(work, "hub-broker-password")},
            extra={"broker_auth": {"enabled": True, "password_file": str(broker_dir / "passwd"),
                                   "acl_file": str(broker_dir / "acl"), "reload_pid_file": str(broker.pid_path)}})
        os.chmod(hub_cfg, 0o600)  # it holds the hub's broker password
        hub = ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(hub_cfg), log_path=logs / "hub.log",
                                  env={"TWIN_ADMIN_PASSWORD": admin_password})
        children.append(hub.start(timeout=60))
        api = f"http://127.0.0.1:{hub_port}"
        print(f"hub        {api}  sign in as 'admin' with password {admin_password}", flush=True)
        if not args.no_models:
            for line in roll_out_shipped_models(api, admin_password):
                print(line, flush=True)

        metrics_port = _port("EDGE_METRICS_PORT", 9108)
        if port_open("127.0.0.1", metrics_port):
            print(f"demo: port {metrics_port} is taken, the edge agent's metrics exporter is off "
                  "(set EDGE_METRICS_PORT)", file=sys.stderr)
            metrics_port = 0
        # The field workflow: the gateway is created at the hub with its devices, and the agent gets
        # its identity, broker login and devices with the one-time claim code (twin-edge provision).
        edge_cfg = work / "edge.toml"
        for line in provision_gateway(api, admin_password, "site-1", "gw-1",
                                      device_tables(devices, args.poll_interval), edge_cfg):
            print(line, flush=True)
        with edge_cfg.open("a") as fh:  # local additions: where the buffer lives, the metrics port
            fh.write(f'\n[buffer]\npath = "{work / "edge-buffer.db"}"\n\n'
                     f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n')
        for line in set_up_billing(api, admin_password, "site-1"):
            print(line, flush=True)
        edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(edge_cfg),
                                   log_path=logs / "edge.log")
        children.append(edge.start())
        print(f"edge agent site-1/gw-1 polling {len(devices)} devices every {args.poll_interval:g}s", flush=True)
        edge_metrics = f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else "off"
        print(f"\nDashboard: {api}/  (sign in as 'admin', password above)\n"
              f"Hub API:   {api}/api/v1/devices\nAPI docs:  {api}/docs\n"
              f"Metrics:   {api}/metrics (hub), {edge_metrics} (edge)\n"
              f"Logs:      {logs}\nPress Ctrl-C to stop.\n", flush=True)
        while not stopping.wait(0.5):
            for child in children:
                if not child.alive():
                    print(f"demo: {child.name} exited unexpectedly; log tail:\n{child.log_tail()}", file=sys.stderr)
                    return 1
        return 0
    except (ProcessFailed, BrokerUnavailable, RuntimeError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _shutdown(children, broker)


def _admin_password(work: Path) -> str:
    """``TWIN_ADMIN_PASSWORD``, else the one this demo directory was first started with, else a new
    random one (kept in ``<workdir>/admin-password``, mode 0600, so a restarted demo can sign in)."""
    return os.environ.get("TWIN_ADMIN_PASSWORD") or _kept_secret(work, "admin-password")


def _kept_secret(work: Path, name: str) -> str:
    """A random secret made once per demo directory and kept there (mode 0600)."""
    kept = work / name
    if kept.exists():
        return kept.read_text().strip()
    secret = secrets.token_urlsafe(18)
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def provision_gateway(api: str, admin_password: str, site: str, gateway: str, devices: list[dict[str, Any]],
                      out: Path) -> list[str]:
    """Create ``site.gateway`` at the hub with ``devices`` (or, if it exists, give it these devices
    and a new claim code) and run ``twin-edge provision`` with the code; lines for the user."""
    token = sign_in(api, "admin", admin_password)
    uid = f"{site}.{gateway}"
    what = "created at the hub"
    body = json.dumps({"site": site, "name": gateway, "devices": devices}).encode()
    try:
        code = http_json("POST", f"{api}/api/v1/gateways", body, "application/json", token)["claim_code"]
    except HttpRefused as exc:
        if exc.status != 409:
            raise
        # Known from an earlier run of this demo directory: today's devices, a fresh code.
        http_json("PUT", f"{api}/api/v1/gateways/{uid}/config", json.dumps({"devices": devices}).encode(),
                   "application/json", token)
        code = http_json("POST", f"{api}/api/v1/gateways/{uid}/claim-code", b"", "application/json",
                          token)["claim_code"]
        what = "known to the hub (given today's devices)"
    done = subprocess.run([sys.executable, "-m", "edge.cli", "provision", "--hub", api, "--code", code,
                           "--out", str(out), "--force"], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"twin-edge provision failed: {done.stderr.strip() or done.stdout.strip()}")
    return [f"gateway    {uid} {what} and provisioned with a one-time claim code ({out}, mode 0600)"]


DEMO_TARIFF = {
    "name": "demo-economy7", "currency": "GBP", "timezone": "Europe/London", "vat_rate": "0.05",
    "standing_charge_per_day": "0.60", "effective_from": "2026-01-01T00:00:00Z",
    "bands": [{"name": "night", "rate": "0.10", "start": "00:30", "end": "07:30"},
              {"name": "day", "rate": "0.30", "start": "07:30", "end": "00:30"}],
}


def set_up_billing(api: str, admin_password: str, site: str) -> list[str]:
    """Give ``site``'s meters a day/night tariff from the start of this month (UTC), so the
    dashboard's meter pages show cost to date; lines for the user. Idempotent: a second run of the
    same demo directory finds both in place (409) and changes nothing."""
    token = sign_in(api, "admin", admin_password)
    month = time.strftime("%Y-%m-01T00:00:00Z", time.gmtime())
    steps = (("/api/v1/tariffs", {**DEMO_TARIFF, "effective_from": min(month, str(DEMO_TARIFF["effective_from"]))}),
             ("/api/v1/tariff-assignments", {"tariff": DEMO_TARIFF["name"], "site": site, "effective_from": month}))
    for path, body in steps:
        try:
            http_json("POST", f"{api}{path}", json.dumps(body).encode(), "application/json", token)
        except HttpRefused as exc:
            if exc.status != 409:  # 409: made by an earlier run of this demo directory
                return [f"billing    not set up ({exc}); the meters run without a tariff"]
    return [f"billing    {site}'s meters on tariff {DEMO_TARIFF['name']} (day 0.30, night 0.10 GBP/kWh) "
            f"from {month[:10]}"]


def roll_out_shipped_models(api: str, admin_password: str) -> list[str]:
    """Upload the shipped models to the hub and assign them fleet-wide; one line per model for the user.

    A model that cannot be rolled out is reported and skipped: the demo runs on without it.
    """
    lines = []
    try:
        token = sign_in(api, "admin", admin_password)
    except (OSError, ValueError, KeyError) as exc:
        return [f"model      not rolled out: cannot sign in as admin ({exc}); the fleet runs without models"]
    for profile, path in shipped_models().items():
        try:
            model = http_json("POST", f"{api}/api/v1/models", path.read_bytes(), "application/octet-stream", token)
            http_json("PUT", f"{api}/api/v1/model-assignments",
                       json.dumps({"profile": profile, "name": model["name"], "version": model["version"]}).encode(),
                       "application/json", token)
            lines.append(f"model      {model['name']} v{model['version']} assigned to every gateway's "
                         f"{profile} devices")
        except (OSError, ValueError, KeyError) as exc:
            lines.append(f"model      {path.name}: not rolled out ({exc}); the fleet runs without it")
    return lines


def _shutdown(children: list[ReadyProcess], broker: Mosquitto) -> None:
    # Edge first (it announces 'offline' through the broker), then hub and simulators, then
    # the broker; everything shares one deadline so the demo is gone within STOP_WITHIN_S.
    deadline = time.monotonic() + STOP_WITHIN_S - 1.0
    for child in reversed(children):
        child.signal(signal.SIGTERM)
    for child in reversed(children):
        child.stop(timeout=max(0.1, deadline - time.monotonic()))
    broker.stop(timeout=max(0.1, deadline - time.monotonic()))
    print("demo: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())

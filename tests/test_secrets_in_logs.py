"""Secrets never reach the logs: real ``twin-hub run`` and ``twin-edge`` processes are taken through
sign-in (right and wrong passwords), user creation, gateway provisioning (claim code, broker
password), configurations holding ``[mqtt] password`` and ``[auth] token_secret``, and a start that
fails on a database URL with a password in it; then every log and captured output is searched for
each secret. The one deliberate exception is the admin password ``twin-hub run`` generates when
``TWIN_ADMIN_PASSWORD`` is unset: printed once, on its own line, to the terminal.

The structlog processor that masks secret-named fields (``protocol/logs.py``) is tested here too.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from fleet.broker import Mosquitto
from fleet.configs import write_hub_config
from fleet.procs import ReadyProcess
from protocol.logs import MASK, configure_logging, get_logger, is_secret_key, redact_text


def _secret(prefix: str) -> str:
    """A unique, greppable secret."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _hub(tmp_path: Path, name: str, broker: Mosquitto, *, db_url: str | None = None,
         extra: dict[str, dict[str, Any]] | None = None, mqtt: dict[str, Any] | None = None,
         env: dict[str, str] | None = None) -> ReadyProcess:
    cfg = write_hub_config(tmp_path / f"{name}.toml", database_url=db_url or f"sqlite://{tmp_path}/{name}.db",
                           mqtt_port=broker.port, http_port=0, log_level="DEBUG", extra=extra, mqtt=mqtt)
    return ReadyProcess.python(name, "hub.cli", "run", "--config", str(cfg), log_path=tmp_path / f"{name}.log",
                               env=env)


def _leaks(texts: dict[str, str], found_secrets: dict[str, str]) -> list[str]:
    return [f"{what} in {where}" for where, text in texts.items()
            for what, value in found_secrets.items() if value and value in text]


def test_no_secret_in_any_log(tmp_path: Path, mosquitto: Mosquitto) -> None:
    admin_pw = _secret("admin-pw")
    wrong_pw = _secret("wrong-pw")
    user_pw = _secret("user-pw")
    hub_mqtt_pw = _secret("hub-mqtt-pw")
    token_secret = _secret("token-secret") * 2  # >= 32 characters
    db_pw = _secret("db-pw")
    found: dict[str, str] = {"admin password": admin_pw, "wrong password": wrong_pw, "user password": user_pw,
                             "hub broker password": hub_mqtt_pw, "token secret": token_secret,
                             "database password": db_pw}
    outputs: dict[str, str] = {}
    procs: list[ReadyProcess] = []
    try:
        hub = _hub(tmp_path, "hub", mosquitto, extra={"auth": {"token_secret": token_secret}},
                   mqtt={"username": "twin-hub", "password": hub_mqtt_pw}, env={"TWIN_ADMIN_PASSWORD": admin_pw})
        procs.append(hub.start(timeout=60))
        api = hub.ready["api"]
        with httpx.Client(base_url=api, timeout=30) as http:
            def sign_in(user: str, password: str) -> httpx.Response:
                return http.post("/api/v1/auth/token", data={"username": user, "password": password})

            assert sign_in("admin", wrong_pw).status_code == 401
            assert sign_in("nobody", wrong_pw).status_code == 401
            r = sign_in("admin", admin_pw)
            assert r.status_code == 200
            found["admin token"] = admin_token = r.json()["access_token"]
            auth = {"Authorization": f"Bearer {admin_token}"}
            r = http.post("/api/v1/users", json={"username": "tech1", "role": "technician", "password": user_pw},
                          headers=auth)
            assert r.status_code == 201, r.text
            r = sign_in("tech1", user_pw)
            assert r.status_code == 200
            found["technician token"] = tech_token = r.json()["access_token"]
            tech = {"Authorization": f"Bearer {tech_token}"}
            assert http.get("/api/v1/auth/me", headers={"Authorization": "Bearer " + tech_token[:-4] + "AAAA"}
                            ).status_code == 401  # a forged token is refused (and not logged)
            r = http.post("/api/v1/gateways", headers=tech, json={
                "site": "site-1", "name": "gw-1",
                "devices": [{"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "port": 1,
                             "poll_interval_s": 0.5}]})
            assert r.status_code == 201, r.text
            found["claim code"] = code = r.json()["claim_code"]
            r = http.post("/api/v1/gateways/site-1.gw-1/claim-code", headers=tech)
            assert r.status_code == 201
            found["second claim code"] = r.json()["claim_code"]
            assert http.post("/api/v1/provision", json={"code": "WRONG-CODE-0000"}).status_code == 403

            # `twin-edge provision` (a real process) claims the code and writes the gateway's edge.toml.
            out = tmp_path / "gw" / "edge.toml"
            prov = subprocess.run([sys.executable, "-m", "edge.cli", "provision", "--hub", api, "--code",
                                   found["second claim code"], "--out", str(out)],
                                  capture_output=True, timeout=60, check=False)
            outputs["twin-edge provision stdout"] = prov.stdout.decode(errors="replace")
            outputs["twin-edge provision stderr"] = prov.stderr.decode(errors="replace")
            assert prov.returncode == 0, outputs["twin-edge provision stderr"]
            assert http.post("/api/v1/provision", json={"code": code}).status_code == 410  # replaced by the 2nd
            edge_cfg = tomllib.loads(out.read_text())
            found["gateway broker password"] = edge_cfg["mqtt"]["password"]
            assert len(found["gateway broker password"]) >= 16
            with out.open("a") as fh:  # a free metrics port; DEBUG for the most output
                fh.write('\n[metrics]\nport = 0\n')
            text = out.read_text()
            if "log_level" not in text:
                out.write_text('log_level = "DEBUG"\n' + text)
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(out),
                                       log_path=tmp_path / "edge.log")
            procs.append(edge.start(timeout=60))
            for _ in range(300):  # the gateway's status reaches the hub through the broker
                gws = http.get("/api/v1/gateways", headers=tech).json()
                if any(g["id"] == "site-1.gw-1" and g["state"] == "online" for g in gws):
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"the gateway never came online: {gws}")
            r = http.put("/api/v1/gateways/site-1.gw-1/config", headers=tech, json={
                "devices": [{"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "port": 2}]})
            assert r.status_code in (200, 201, 202), r.text
    finally:
        for p in reversed(procs):
            p.stop()

    # A start that fails: the database URL carries a password.
    bad = _hub(tmp_path, "hub-bad-db", mosquitto, db_url=f"postgres://twin:{db_pw}@127.0.0.1:1/twin",
               env={"TWIN_ADMIN_PASSWORD": admin_pw})
    with pytest.raises(Exception, match="before it was ready"):
        bad.start(timeout=60)
    bad_log = (tmp_path / "hub-bad-db.log").read_text()
    assert "hub_start_failed" in bad_log and f"postgres://twin:{MASK}@127.0.0.1:1/twin" in bad_log

    outputs |= {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    outputs["edge.toml"] = ""  # the file itself holds the password by design; not a log
    outputs["mosquitto.log"] = mosquitto.log_path.read_text(errors="replace")
    assert set(outputs) >= {"hub.log", "edge.log", "hub-bad-db.log", "mosquitto.log"}
    assert "login_failed" in outputs["hub.log"] and "tech1" in outputs["hub.log"]  # the logs do say things
    assert _leaks(outputs, found) == []


def test_generated_admin_password_is_printed_once_on_its_own_line(tmp_path: Path, mosquitto: Mosquitto,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWIN_ADMIN_PASSWORD", raising=False)
    hub = _hub(tmp_path, "hub", mosquitto)
    hub.start(timeout=60)
    try:
        with httpx.Client(base_url=hub.ready["api"], timeout=30) as http:
            log = (tmp_path / "hub.log").read_text()
            found = re.findall(r"created user 'admin' with password (\S+) - shown only now", log)
            assert len(found) == 1
            password = found[0]
            r = http.post("/api/v1/auth/token", data={"username": "admin", "password": password})
            assert r.status_code == 200  # it is the real one
            assert http.post("/api/v1/auth/token", data={"username": "admin", "password": "x" + password}
                             ).status_code == 401
    finally:
        hub.stop()
    lines = [line for line in (tmp_path / "hub.log").read_text().splitlines() if password in line]
    assert len(lines) == 1 and lines[0].startswith("twin-hub: created user 'admin' with password ")
    # Started again on the same database: the admin exists, nothing is generated or printed.
    again = _hub(tmp_path, "hub", mosquitto)
    again.start(timeout=60)
    again.stop()
    assert (tmp_path / "hub.log").read_text().count("created user 'admin'") == 1


def test_invalid_configurations_name_the_key_not_the_secret(tmp_path: Path) -> None:
    """A configuration refused at start says which key is wrong, never the value it holds."""
    hub_secret, edge_secret = _secret("hub-secret"), _secret("edge-secret")
    (tmp_path / "hub.toml").write_text(
        f'[database]\nurl = "postgres://twin:{hub_secret}@db/twin"\n[mqtt]\nusername = "hub"\n'
        f'password = "{hub_secret}"\nport = "x"\n[auth]\ntoken_secret = "{hub_secret}"\n')
    (tmp_path / "edge.toml").write_text(
        f'[gateway]\nsite = "s"\nname = "g"\n[mqtt]\nusername = "u"\npassword = "{edge_secret}"\n'
        f'port = 99999\nsecret_typo = "{edge_secret}"\n')
    runs = [subprocess.run([sys.executable, "-m", "hub.cli", "check", "--config", str(tmp_path / "hub.toml")],
                           capture_output=True, timeout=60, check=False),
            subprocess.run([sys.executable, "-m", "edge.cli", "check-config", "--config", str(tmp_path / "edge.toml")],
                           capture_output=True, timeout=60, check=False)]
    text = "".join((r.stdout + r.stderr).decode() for r in runs)
    assert [r.returncode for r in runs] == [2, 2]
    assert "mqtt.secret_typo" in text and "mqtt.port" in text
    assert hub_secret not in text and edge_secret not in text


# -- the masking processor ---------------------------------------------------------------------

@pytest.mark.parametrize(("key", "masked"), [
    ("password", True), ("mqtt_password", True), ("Passwd", True), ("token_secret", True), ("access_token", True),
    ("token", True), ("Authorization", True), ("api_key", True), ("code", True), ("claim_code", True),
    ("stripe_secret_key", True), ("refresh_token", True),
    ("function_code", False), ("status_code", False), ("username", False), ("gateway", False), ("url", False),
])
def test_secret_key_names(key: str, masked: bool) -> None:
    assert is_secret_key(key) is masked


def test_redact_text_masks_url_passwords() -> None:
    assert redact_text("postgres://twin:s3cr@t@db.example:5432/twin") == "postgres://twin:***@db.example:5432/twin"
    assert redact_text("mqtts://gw:pw@broker:8883 and https://user:x@hub/") == (
        "mqtts://gw:***@broker:8883 and https://user:***@hub/")
    assert redact_text("no url, alice@example.net") == "no url, alice@example.net"
    assert redact_text("sqlite:///tmp/hub.db") == "sqlite:///tmp/hub.db"


def test_log_calls_cannot_leak_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    structlog.reset_defaults()
    configure_logging("DEBUG", json=True)
    try:
        log = get_logger("tests.secrets")
        log.info("careless", password="pw-1", mqtt_password="pw-2", token_secret="pw-3", claim_code="pw-4",
                 authorization="Bearer pw-5", code="pw-6", config={"password": "pw-7", "port": 1883},
                 url="postgres://u:pw-8@h/db", function_code=3, username="alice")
        try:
            raise RuntimeError("cannot connect to postgres://u:pw-9@h/db")
        except RuntimeError:
            log.exception("failed")
        logging.getLogger("some.library").warning("connecting to %s", "mqtt://u:pw-10@h")
    finally:
        structlog.reset_defaults()
        configure_logging("INFO")
    text = stream.getvalue()
    assert not re.search(r"pw-\d+", text), text
    first = json.loads(text.splitlines()[0])
    assert (first["password"], first["code"], first["function_code"], first["username"]) == (MASK, MASK, 3, "alice")
    assert first["config"] == {"password": MASK, "port": 1883}
    assert first["url"] == f"postgres://u:{MASK}@h/db"

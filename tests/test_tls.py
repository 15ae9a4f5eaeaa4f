"""TLS on real parts: a throw-away CA (fleet.tlsca), Mosquitto's TLS listener, the edge agent as a real
process publishing over TLS, the hub ingesting over TLS and serving its API over HTTPS, model downloads
over HTTPS; and the refusals: unknown CA, no CA, missing client certificate, TLS 1.1, wrong host name."""

from __future__ import annotations

import asyncio
import http.server
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from cryptography import x509

from edge.config import load_config as load_edge_config
from edge.inference import download_tls_context
from edge.inference.rollout import download
from edge.inference.runtime import ModelLoadError
from fleet.broker import BrokerTls, Mosquitto, find_mosquitto
from fleet.configs import write_edge_config
from fleet.net import free_port, wait_for_port
from fleet.procs import ReadyProcess
from fleet.tlsca import CertAuthority
from fleet.tlsca import main as tlsca_main
from hub import queries, rollout
from hub.config import load_config as load_hub_config
from hub.ingest import now_ms
from hub.modelfile import inspect_model
from hub.service import running_hub
from protocol.tls import client_context
from protocol.tomlconfig import ConfigError
from tests.hubtools import hub_config, wait_until
from tests.tlstools import Pki

pytestmark = pytest.mark.integration

SHIPPED_BOILER_MODEL = Path(__file__).resolve().parents[1] / "models" / "shipped" / "sim-boiler-anomaly.onnx"


def _sans(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


# -- the CA ------------------------------------------------------------------------------------


def test_tlsca_cli_creates_ca_once_and_issues_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    assert tlsca_main([str(pki), "--host", "broker.example.net", "--host", "10.0.0.5", "--client", "gw-1"]) == 0
    ca_pem = (pki / "ca.pem").read_bytes()
    assert _sans(pki / "broker.example.net.pem") == ["broker.example.net", "10.0.0.5", "localhost", "127.0.0.1", "::1"]
    for key in ("ca.key", "broker.example.net.key", "client-gw-1.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE((pki / "ca.pem").stat().st_mode) == 0o644
    # A second run reuses the CA: gateways keep trusting the same ca.pem.
    assert tlsca_main([str(pki), "--host", "hub.example.net", "--name", "hub", "--no-loopback"]) == 0
    assert (pki / "ca.pem").read_bytes() == ca_pem
    assert _sans(pki / "hub.pem") == ["hub.example.net"]
    ca = x509.load_pem_x509_certificate(ca_pem)
    for issued in ("hub.pem", "broker.example.net.pem", "client-gw-1.pem"):
        x509.load_pem_x509_certificate((pki / issued).read_bytes()).verify_directly_issued_by(ca)
    client = x509.load_pem_x509_certificate((pki / "client-gw-1.pem").read_bytes())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    out = capsys.readouterr().out
    assert "created" in out and "using the CA" in out
    with pytest.raises(SystemExit):
        tlsca_main([str(pki), "--client", "../escape"])


# -- the broker --------------------------------------------------------------------------------


async def _roundtrip(port: int, ctx: ssl.SSLContext, timeout: float = 5) -> bytes:
    async with aiomqtt.Client("127.0.0.1", port, tls_context=ctx, timeout=timeout) as client:
        await client.subscribe("tls/test", qos=1)
        await client.publish("tls/test", b"over tls", qos=1)
        async with _timeout(5):
            async for msg in client.messages:
                assert isinstance(msg.payload, bytes)
                return msg.payload
    raise AssertionError("no message")


def _timeout(s: float) -> asyncio.Timeout:
    return asyncio.timeout(s)


async def _refused(port: int, ctx: ssl.SSLContext, timeout: float = 5) -> str:
    with pytest.raises(aiomqtt.MqttError) as info:
        async with _timeout(10):
            await _roundtrip(port, ctx, timeout)
    return str(info.value)


async def test_broker_tls_listener_accepts_the_ca_and_refuses_others(mosquitto_tls: Mosquitto, tls_ca: Pki) -> None:
    assert mosquitto_tls.tls_port == mosquitto_tls.port
    assert await _roundtrip(mosquitto_tls.port, client_context(tls_ca.ca)) == b"over tls"
    # The system trust store does not know the private CA; a rogue CA is no better.
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(mosquitto_tls.port, client_context(None))
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(mosquitto_tls.port, client_context(tls_ca.rogue_ca))
    # Plain MQTT to the TLS port gets nowhere.
    with pytest.raises(aiomqtt.MqttError):
        async with _timeout(10), aiomqtt.Client("127.0.0.1", mosquitto_tls.port, timeout=3):
            pass
    # TLS 1.1: the broker answers with a protocol_version alert and logs why.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(tls_ca.ca)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let our side offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    assert "TLSV1_ALERT_PROTOCOL_VERSION" in await _refused(mosquitto_tls.port, old)
    assert "unsupported protocol" in mosquitto_tls.log_path.read_text()


async def test_broker_tls_beside_plain_listener(tmp_path: Path, tls_ca: Pki) -> None:
    with Mosquitto(workdir=tmp_path / "b", tls=BrokerTls(tls_ca.ca, tls_ca.server_cert, tls_ca.server_key)) as broker:
        assert broker.tls_port not in (None, broker.port)
        assert broker.tls_port is not None
        assert await _roundtrip(broker.tls_port, client_context(tls_ca.ca)) == b"over tls"
        async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as plain:
            await plain.publish("plain/test", b"x", qos=1)


async def test_broker_requiring_client_certificates(tmp_path: Path, tls_ca: Pki) -> None:
    tls = BrokerTls(tls_ca.ca, tls_ca.server_cert, tls_ca.server_key, require_certificate=True)
    with Mosquitto(workdir=tmp_path / "b", tls=tls, plain=False) as broker:
        good = client_context(tls_ca.ca, tls_ca.client_cert, tls_ca.client_key)
        assert await _roundtrip(broker.port, good) == b"over tls"
        # With TLS 1.3 the client's handshake is over before the broker checks its certificate: the
        # client sees no CONNACK (a timeout), the broker's log says why.
        await _refused(broker.port, client_context(tls_ca.ca), timeout=1.5)
        await _refused(broker.port, client_context(tls_ca.ca, tls_ca.rogue_client_cert, tls_ca.rogue_client_key),
                       timeout=1.5)
        log = broker.log_path.read_text()
        assert "peer did not return a certificate" in log
        assert log.count("certificate verify failed") >= 1


async def test_hostname_is_checked_unless_tls_insecure(tmp_path: Path) -> None:
    ca = CertAuthority.create("name check CA", days=1)
    ca.save(tmp_path)
    ca.issue_server(["broker.elsewhere.test"], loopback=False, days=1).write(tmp_path / "s.pem", tmp_path / "s.key")
    with Mosquitto(workdir=tmp_path / "b", plain=False,
                   tls=BrokerTls(tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "s.key")) as broker:
        assert "IP address mismatch" in await _refused(broker.port, client_context(tmp_path / "ca.pem"))
        insecure = client_context(tmp_path / "ca.pem", check_hostname=False)
        assert await _roundtrip(broker.port, insecure) == b"over tls"


# -- configuration -----------------------------------------------------------------------------


def _edge_toml(tmp_path: Path, mqtt: str, inference: str = "") -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f'[gateway]\nsite = "s"\nname = "g"\n\n[mqtt]\nport = 8883\n{mqtt}\n[inference]\n{inference}\n')
    return path


def test_edge_config_tls_options(tmp_path: Path, tls_ca: Pki) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.pem").write_bytes(tls_ca.ca.read_bytes())
    cfg, _ = load_edge_config(_edge_toml(tmp_path, 'tls = true\nca_file = "pki/ca.pem"\n'))
    assert cfg.mqtt.tls and cfg.mqtt.ca_file == tmp_path / "pki" / "ca.pem"  # relative to the file
    ctx = cfg.mqtt.tls_context()
    assert ctx is not None and ctx.check_hostname and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # Model downloads trust the broker's CA unless [inference] ca_file says otherwise.
    assert len(download_tls_context(cfg).get_ca_certs()) == 1

    def problems(mqtt: str, inference: str = "") -> str:
        with pytest.raises(ConfigError) as info:
            load_edge_config(_edge_toml(tmp_path, mqtt, inference))
        return str(info.value)

    assert problems('tls = true\nca_file = "nope.pem"\n') == (
        f"{tmp_path / 'edge.toml'}:8: mqtt.ca_file: no such file: {tmp_path / 'nope.pem'}")
    assert problems('ca_file = "pki/ca.pem"\n').endswith("edge.toml:5: mqtt: ca_file only apply with tls = true")
    assert "client_cert and client_key go together" in problems(f'tls = true\nclient_cert = "{tls_ca.client_cert}"\n')
    assert "tls_insecure only apply with tls = true" in problems("tls_insecure = true\n")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert "mqtt.ca_file: not a usable PEM CA file" in problems('tls = true\nca_file = "junk.pem"\n')
    assert "mqtt.client_cert: certificate and key do not load together" in problems(
        f'tls = true\nclient_cert = "{tls_ca.client_cert}"\nclient_key = "{tls_ca.rogue_client_key}"\n')
    assert "inference.ca_file: no such file" in problems("tls = false\n", 'ca_file = "missing.pem"\n')


def test_hub_config_tls_options(tmp_path: Path, tls_ca: Pki) -> None:
    def write(text: str) -> Path:
        path = tmp_path / "hub.toml"
        path.write_text(text)
        return path

    cfg = load_hub_config(write(
        f'[mqtt]\nport = 8883\ntls = true\nca_file = "{tls_ca.ca}"\n\n'
        f'[http]\ntls_cert_file = "{tls_ca.server_cert}"\ntls_key_file = "{tls_ca.server_key}"\n'))
    assert cfg.mqtt.tls_context() is not None and cfg.http.tls_key_file == tls_ca.server_key
    with pytest.raises(ConfigError) as info:
        load_hub_config(write('[http]\ntls_cert_file = "cert.pem"\ntls_key_file = "key.pem"\n'))
    assert str(info.value).splitlines() == [
        f"{tmp_path / 'hub.toml'}:2: http.tls_cert_file: no such file: {tmp_path / 'cert.pem'}",
        f"{tmp_path / 'hub.toml'}:3: http.tls_key_file: no such file: {tmp_path / 'key.pem'}"]
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_hub_config(write(f'[http]\ntls_cert_file = "{tls_ca.server_cert}"\n'))
    with pytest.raises(ConfigError, match=r"http\.tls_cert_file: certificate and key do not load together"):
        load_hub_config(write(
            f'[http]\ntls_cert_file = "{tls_ca.server_cert}"\ntls_key_file = "{tls_ca.client_key}"\n'))
    with pytest.raises(ConfigError, match=r"hub\.toml:3: mqtt\.ca_file: no such file"):
        load_hub_config(write('[mqtt]\ntls = true\nca_file = "none.pem"\n'))


# -- model downloads over HTTPS ----------------------------------------------------------------


@pytest.fixture
def https_files(tls_ca: Pki) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 (certificate from ``tls_ca``) serving b"model bytes" at /m.onnx."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"model bytes"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_ca.server_cert, tls_ca.server_key)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/m.onnx"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_model_download_verifies_https_with_the_configured_ca(https_files: str, tls_ca: Pki) -> None:
    assert download(https_files, 100, 10, client_context(tls_ca.ca)) == b"model bytes"
    with pytest.raises(ModelLoadError, match="CERTIFICATE_VERIFY_FAILED"):
        download(https_files, 100, 10)  # system trust store
    with pytest.raises(ModelLoadError, match="CERTIFICATE_VERIFY_FAILED"):
        download(https_files, 100, 10, client_context(tls_ca.rogue_ca))


def _handshake(port: int, ctx: ssl.SSLContext) -> str | None:
    """A bare TLS handshake with 127.0.0.1:port (blocking); the protocol version agreed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.version()


# -- end to end --------------------------------------------------------------------------------


async def test_edge_process_to_hub_over_tls(tmp_path: Path, mosquitto_tls: Mosquitto, tls_ca: Pki) -> None:
    """A real edge agent publishes through the TLS-only broker; the hub ingests over TLS and serves HTTPS,
    from which the agent downloads the model the hub rolls out."""
    cfg = hub_config(db_url=f"sqlite://{tmp_path / 'hub.db'}", mqtt_port=mosquitto_tls.port,
                     mqtt={"tls": True, "ca_file": str(tls_ca.ca)},
                     http={"tls_cert_file": str(tls_ca.server_cert), "tls_key_file": str(tls_ca.server_key)})
    procs: list[ReadyProcess] = []
    try:
        async with running_hub(cfg) as hub:
            assert hub.api_url.startswith("https://127.0.0.1:")
            sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "1", "--meters", "0",
                                      "--base-port", "0", "--tick", "0.2", log_path=tmp_path / "sim.log")
            procs.append(sim.start())
            edge_toml = write_edge_config(tmp_path / "edge" / "edge.toml", site="site-tls", gateway="gw-tls",
                                          mqtt_port=mosquitto_tls.port, devices=sim.ready["devices"],
                                          poll_interval_s=0.1,
                                          mqtt={"tls": True, "ca_file": str(tls_ca.ca), "batch_max_delay_ms": 20})
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(edge_toml),
                                       log_path=tmp_path / "edge.log")
            procs.append(edge.start())
            await wait_until(lambda: hub.stats.readings_stored >= 30, 30, "30 readings over TLS")
            devices = await queries.list_devices(hub.db)
            assert [d.uid for d in devices] == ["site-tls.gw-tls.boiler-1"]
            assert len(await queries.readings(hub.db, devices[0].pk)) >= 5
            assert "mqtt_connected" in (tmp_path / "edge.log").read_text()

            async with httpx.AsyncClient(verify=client_context(tls_ca.ca), timeout=10) as client:
                resp = await client.get(f"{hub.api_url}/api/v1/health")
            assert resp.status_code == 200
            assert resp.json()["broker"]["connected"] is True
            async with httpx.AsyncClient(timeout=10) as client:  # the system trust store: refused
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await client.get(f"{hub.api_url}/api/v1/health")
            async with httpx.AsyncClient(timeout=10) as client:  # plain HTTP to the HTTPS port: no answer
                with pytest.raises(httpx.HTTPError):
                    await client.get(hub.api_url.replace("https://", "http://") + "/api/v1/health")
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.load_verify_locations(tls_ca.ca)
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
            assert hub.port is not None
            # TLS 1.1: refused by the hub (asyncio's server drops the connection without sending the alert),
            # while the same bare handshake at 1.2+ succeeds.
            with pytest.raises(ssl.SSLError, match=r"UNEXPECTED_EOF|ALERT_PROTOCOL_VERSION"):
                await asyncio.to_thread(_handshake, hub.port, old)
            assert await asyncio.to_thread(_handshake, hub.port, client_context(tls_ca.ca)) in ("TLSv1.2", "TLSv1.3")

            # A model rolled out over MQTT (TLS) is downloaded from the hub over HTTPS, verified with the
            # broker's CA (no [inference] ca_file set): it becomes the gateway's active model.
            data = SHIPPED_BOILER_MODEL.read_bytes()
            checked = inspect_model(data)
            await rollout.save_version(hub.db, checked, data, "tls-test", now_ms())
            await rollout.assign(hub.db, "sim-boiler", checked.card.name, checked.card.version, None, "tls-test",
                                 now_ms())
            hub.rollout.mark_all()
            active = tmp_path / "edge" / "models" / "active.json"
            await wait_until(lambda: active.exists() and checked.sha256 in active.read_text(), 30,
                             f"the model downloaded over HTTPS; edge log:\n{edge.log_tail()}")
            edge_log = (tmp_path / "edge.log").read_text()
            assert f'"url": "{hub.api_url}/api/v1/models/{checked.card.name}/1/file"' in edge_log
            assert "access=" not in edge_log  # the download capability is a credential: never logged
            assert edge.stop() == 0  # SIGTERM: a clean TLS disconnect, exit code 0
    finally:
        for p in reversed(procs):
            p.stop()


# -- the production examples -------------------------------------------------------------------


def test_production_examples_load_with_their_certificates(tmp_path: Path) -> None:
    """examples/{hub,edge}.production.toml through the real loaders, beside a pki/ made by fleet.tlsca."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    etc = tmp_path / "etc-twin"
    etc.mkdir()
    for name in ("hub.production.toml", "edge.production.toml"):
        (etc / name).write_text((examples / name).read_text())
    with pytest.raises(ConfigError) as info:  # no certificates yet: each missing file named with its line
        load_hub_config(etc / "hub.production.toml")
    assert [p.split(": ")[1] for p in info.value.problems] == ["mqtt.ca_file", "http.tls_cert_file",
                                                               "http.tls_key_file"]
    assert tlsca_main([str(etc / "pki"), "--host", "hub.example.net", "--name", "hub"]) == 0

    hub = load_hub_config(etc / "hub.production.toml")
    assert (hub.mqtt.tls, hub.mqtt.port, hub.mqtt.ca_file, hub.mqtt.tls_insecure) == (
        True, 8883, etc / "pki" / "ca.pem", False)
    assert (hub.http.tls_cert_file, hub.http.tls_key_file) == (etc / "pki" / "hub.pem", etc / "pki" / "hub.key")
    assert hub.http.public_url == "https://hub.example.net:8443"
    assert "hub.example.net" in _sans(etc / "pki" / "hub.pem")

    edge, profiles = load_edge_config(etc / "edge.production.toml")
    assert (edge.mqtt.tls, edge.mqtt.port, edge.mqtt.ca_file, edge.mqtt.username) == (
        True, 8883, etc / "pki" / "ca.pem", "gw-1")
    assert edge.inference.hub_url == "https://hub.example.net:8443"
    ca_subject = x509.load_pem_x509_certificate((etc / "pki" / "ca.pem").read_bytes()).subject.rfc4514_string()
    assert len(download_tls_context(edge).get_ca_certs()) == 1 and "digital-twin" in ca_subject
    assert list(profiles) == ["boiler-1"]


async def test_production_mosquitto_conf_runs_tls_only_with_passwords(tmp_path: Path, tls_ca: Pki) -> None:
    """examples/mosquitto.production.conf in a real Mosquitto (paths and port moved into tmp): TLS with a
    password gets in; anonymous clients, wrong passwords and an unknown CA are refused."""
    text = (Path(__file__).resolve().parents[1] / "examples" / "mosquitto.production.conf").read_text()
    port = free_port()
    pki = tmp_path / "pki"
    pki.mkdir()
    for src, dst in ((tls_ca.ca, "ca.pem"), (tls_ca.server_cert, "broker.pem"), (tls_ca.server_key, "broker.key")):
        (pki / dst).write_bytes(src.read_bytes())
    (tmp_path / "twin").mkdir()
    passwd = tmp_path / "twin" / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "gw-1", "s3cret-gw-1"], check=True, timeout=30)
    (tmp_path / "twin" / "acl").write_text("user gw-1\ntopic readwrite twin/#\n")
    (tmp_path / "data").mkdir()
    text = (text.replace("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1")
            .replace("/etc/mosquitto/pki/", f"{pki}/").replace("/etc/mosquitto/", f"{tmp_path}/")
            .replace("/var/lib/mosquitto/", f"{tmp_path / 'data'}/")
            .replace("log_dest syslog", f"log_dest file {tmp_path / 'mosquitto.log'}"))
    assert not re.search(r"/etc/|/var/", text), text
    if os.geteuid() == 0:
        text += "user root\n"  # as in fleet.broker: stay root inside pytest's private temp dir
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, 10)
        ctx = client_context(tls_ca.ca)
        async with aiomqtt.Client("127.0.0.1", port, tls_context=ctx, username="gw-1", password="s3cret-gw-1",
                                  timeout=5) as client:
            await client.publish("twin/v1/site-1/gw-1/status", b"{}", qos=1)
        for user, password in ((None, None), ("gw-1", "wrong")):
            with pytest.raises(aiomqtt.MqttError, match=r"Not authorized|Bad user name or password"):
                async with _timeout(10), aiomqtt.Client("127.0.0.1", port, tls_context=ctx, username=user,
                                                        password=password, timeout=5):
                    pass
        assert "CERTIFICATE_VERIFY_FAILED" in await _refused(port, client_context(tls_ca.rogue_ca))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode(errors="replace")

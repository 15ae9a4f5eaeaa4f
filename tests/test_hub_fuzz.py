"""Hostile HTTP input: schemathesis generates requests from the hub's own OpenAPI document and sends
them to a real hub (uvicorn on 127.0.0.1, real Mosquitto, seeded SQLite database) signed in as admin
and signed out. No answer may be a 5xx, except a 502/503 the operation documents (payments provider
unreachable or off, broker not connected).

The hub runs in a thread with its own event loop: schemathesis' test function is synchronous and
sends its requests with a blocking client, which must not block the hub's loop.

Regressions of the 500s it found are pinned in ``test_found_bugs_stay_fixed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from fleet.broker import BrokerUnavailable, Mosquitto
from hub.api import ApiContext, create_app
from hub.api.limits import MAX_BODY_BYTES
from hub.db import Database
from hub.service import running_hub
from hub.store import Store, TelemetryItem
from tests.hubtools import ADMIN_PASSWORD, BearerAuth, add_user, admin_auth, hub_config, model_card, telemetry
from tests.parts import missing_part

# Bounded and reproducible: the same examples every run (derandomize), few per operation, no
# shrinking (a failure is reported with the example that found it), no per-example deadline (the
# two shared cores are slow at times; a slow answer is not what this test looks for).
# TWIN_FUZZ_EXAMPLES raises the count for a deeper run by hand (make test keeps 12).
FUZZ = settings(max_examples=int(os.environ.get("TWIN_FUZZ_EXAMPLES", "12")), derandomize=True, deadline=None,
                database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))
FUZZ_SIGNED_OUT = settings(FUZZ, max_examples=4)

METER = "plant1.gw1.meter1"
DAY = {"meter": METER, "since": "2026-03-29T00:00:00Z", "until": "2026-03-29T23:00:00Z"}
ECONOMY7: dict[str, Any] = {
    "name": "economy7", "currency": "GBP", "timezone": "Europe/London", "vat_rate": "0.05",
    "standing_charge_per_day": "0.60", "effective_from": "2026-01-01T00:00:00Z",
    "bands": [{"name": "night", "rate": "0.10", "start": "00:30", "end": "07:30"},
              {"name": "day", "rate": "0.30", "start": "07:30", "end": "00:30"}],
}


def _ms(text: str) -> int:
    from datetime import UTC, datetime
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1000


async def _seed(db: Database, base_url: str) -> None:
    """Sites, gateways, devices and readings through the store; a tariff, a meter reading, a
    statement, a provisioned gateway and an alert-worthy pressure through the API."""
    kinds = {"meter1": "meter", "boiler1": "boiler"}
    readings = [("meter1", "energy_import", 1, _ms("2026-03-29T00:00"), 0.0, "kWh", "good"),
                ("meter1", "energy_import", 2, _ms("2026-03-29T12:00"), 120.0, "kWh", "good"),
                ("meter1", "power", 3, _ms("2026-03-29T12:00"), 10.0, "kW", "good"),
                ("boiler1", "flow_temp", 1, _ms("2026-03-29T12:00"), 60.0, "degC", "good"),
                ("boiler1", "pressure", 2, _ms("2026-03-29T12:00"), 0.1, "bar", "good"),
                ("boiler1", "burner_on", 3, _ms("2026-03-29T12:00"), True, "", "good")]
    await Store(db).write([TelemetryItem(telemetry("plant1", "gw1", readings, kinds=kinds), _ms("2026-03-29T12:00")),
                           TelemetryItem(telemetry("plant2", "gw7", readings[:2], kinds=kinds),
                                         _ms("2026-03-29T12:00"))])
    async with httpx.AsyncClient(base_url=base_url, auth=BearerAuth("admin", ADMIN_PASSWORD), timeout=30) as http:
        steps: list[tuple[str, str, Any]] = [
            ("POST", "/api/v1/tariffs", ECONOMY7),
            ("POST", "/api/v1/tariff-assignments", {"site": "plant1", "tariff": "economy7",
                                                    "effective_from": "2026-01-01T00:00:00Z"}),
            ("POST", f"/api/v1/meters/{METER}/readings", {"value": "230.00", "ts": "2026-03-29T23:00:00Z"}),
            ("POST", "/api/v1/statements", DAY),
            ("POST", "/api/v1/gateways", {"site": "plant3", "name": "gw1"}),
            ("POST", "/api/v1/users", {"username": "viewer1", "role": "viewer", "password": "viewer-password-1"}),
        ]
        for method, path, body in steps:
            r = await http.request(method, path, json=body)
            assert r.status_code in (200, 201), f"seeding {method} {path}: {r.status_code} {r.text}"


@dataclass
class FuzzHub:
    base_url: str
    token: str


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzHub]:
    """A seeded hub in a thread of its own, for the whole module."""
    tmp = tmp_path_factory.mktemp("fuzz")
    try:
        broker = Mosquitto(workdir=tmp / "mosquitto")
        broker.start()
    except BrokerUnavailable as exc:
        missing_part(str(exc), "apt-get install mosquitto")
    config = hub_config(db_url=f"sqlite://{tmp}/hub.db", mqtt_port=broker.port,
                        alerts={"builtin_rules": False, "rules": [
                            {"type": "threshold", "name": "pressure", "metric": "pressure", "below": 0.8,
                             "severity": "critical"}]})
    ready = threading.Event()
    started: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with running_hub(config, admin_password=ADMIN_PASSWORD) as hub:
                await _seed(hub.db, hub.api_url)
                async with httpx.AsyncClient(base_url=hub.api_url) as http:
                    r = await http.post("/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD})
                started["hub"] = FuzzHub(hub.api_url, r.json()["access_token"])
                ready.set()
                await stop.wait()
        except BaseException as exc:
            started["error"] = exc
            ready.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="fuzz-hub", daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the hub did not start within 60 s"
        if "error" in started:
            raise AssertionError(f"the hub did not start: {started['error']!r}") from started["error"]
        yield started["hub"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
        broker.cleanup()


@pytest.fixture(scope="module")
def api_schema(fuzz_hub: FuzzHub) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_hub.base_url}/openapi.json")


def _documented(case: Any, status: int) -> bool:
    """Whether the operation's OpenAPI answers list ``status``."""
    return str(status) in case.operation.definition.raw.get("responses", {})


def _server_error(case: Any, response: Any) -> str | None:
    """A 5xx that is not a 502/503 the operation documents, described with its request."""
    status = response.status_code
    if status < 500 or (status in (502, 503) and _documented(case, status)):
        return None
    return (f"{case.method} {case.formatted_path} -> {status}: {response.text[:300]!r} "
            f"query={case.query!r} body={case.body!r}"[:1000])


# Path parameters that name seeded objects, so the generated requests reach past the 404s too.
KNOWN = {"device_id": "plant1.gw1.boiler1", "meter_id": METER, "gateway_id": "plant1.gw1", "alert_id": 1,
         "number": "ST-2026-000001", "username": "viewer1", "command_id": 1, "name": "sim-boiler-anomaly",
         "version": 1}


def _fuzz(schema: Any, hub: FuzzHub, mode: GenerationMode, fuzz: settings, signed_in: bool) -> list[str]:
    """Run every operation through ``fuzz`` examples (random path parameters, then known ones);
    the server errors found, all of them (not only the first)."""
    headers = {"Authorization": f"Bearer {hub.token}"} if signed_in else {}
    found: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40, "the hub's OpenAPI lists fewer operations than expected"
    for operation in operations:
        if operation.definition.raw.get("x-stream"):
            continue  # a live event stream (the dashboard's) does not end: not a request/response
        known = {p.name: KNOWN[p.name] for p in operation.path_parameters if p.name in KNOWN}
        strategies = [operation.as_strategy(mode)]
        if known:
            strategies.append(operation.as_strategy(mode, path_parameters=known))
        for strategy in strategies:
            @fuzz
            @given(case=strategy)
            def run(case: Any) -> None:
                response = case.call(base_url=hub.base_url, headers=headers, timeout=30)
                statuses[response.status_code] += 1
                problem = _server_error(case, response)
                if problem and problem not in found:
                    found.append(problem)
            # Negative mode: an operation without parameters or body has nothing to break.
            with contextlib.suppress(Unsatisfiable):
                run()
    print(f"{mode} signed_in={signed_in}: {sorted(statuses.items())}")
    return found


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_signed_in(api_schema: Any, fuzz_hub: FuzzHub, mode: GenerationMode) -> None:
    found = _fuzz(api_schema, fuzz_hub, mode, FUZZ, signed_in=True)
    assert found == [], "\n".join(found)


def test_no_server_errors_signed_out(api_schema: Any, fuzz_hub: FuzzHub) -> None:
    found = _fuzz(api_schema, fuzz_hub, GenerationMode.POSITIVE, FUZZ_SIGNED_OUT, signed_in=False)
    assert found == [], "\n".join(found)


# -- what the fuzzing found, pinned ------------------------------------------------------------

@pytest.fixture
async def app_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The hub's app in process (no broker) on an empty SQLite database, signed in as admin."""
    db = await Database(f"sqlite://{tmp_path}/hub.db").open()
    try:
        await add_user(db, "admin", "admin", ADMIN_PASSWORD)
        app = create_app(ApiContext(db=db))
        async with httpx.AsyncClient(auth=admin_auth(), transport=httpx.ASGITransport(app=app),
                                     base_url="http://hub") as client:
            yield client
    finally:
        await db.close()


async def test_found_bugs_stay_fixed(app_client: httpx.AsyncClient) -> None:
    huge = 3127458164651237310464  # beyond any integer column: was an OverflowError, a 500
    r = await app_client.get(f"/api/v1/models/sim-boiler-anomaly/{huge}")
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["path", "version"])
    r = await app_client.get(f"/api/v1/models/sim-boiler-anomaly/{huge}/file")
    assert r.status_code == 422
    r = await app_client.get(f"/api/v1/models/sim-boiler-anomaly/{2**31 - 1}")
    assert r.status_code == 404  # the largest storable version is a fine question, just unknown
    r = await app_client.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "m", "version": huge})
    assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["body", "version"])
    # A statement number longer than its 32-character column: Tortoise refused the filter value (500).
    for suffix in ("", ".html", ".pdf"):
        r = await app_client.get(f"/api/v1/statements/{'𝐓𝐡𝐞 𝐪𝐮𝐢𝐜𝐤 𝐛𝐫𝐨𝐰𝐧 𝐟𝐨𝐱' * 3}{suffix}")
        assert r.status_code == 404, suffix
    for method, action in (("POST", "send"), ("POST", "checkout")):
        r = await app_client.request(method, f"/api/v1/statements/{'N' * 33}/{action}")
        assert r.status_code in (404, 503), action  # checkout: payments are off here (documented 503)
    with pytest.raises(ValueError, match="less than or equal to 2147483647"):
        model_card(version=2**31)  # a model file whose card carries such a version is refused too


async def test_request_bodies_are_bounded(app_client: httpx.AsyncClient) -> None:
    big = b"[" + b"1," * (MAX_BODY_BYTES // 2) + b"1]"
    r = await app_client.post("/api/v1/tariffs", content=big, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (413, {"detail": f"request body exceeds {MAX_BODY_BYTES} bytes"})

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b" " * (MAX_BODY_BYTES // 2)
        yield b"{}"
    r = await app_client.post("/api/v1/tariffs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # Thousands of nested brackets in a small body: a parse error, not a RecursionError 500.
    r = await app_client.post("/api/v1/tariffs", content=b"[" * 200_000, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    r = await app_client.post("/api/v1/auth/token", content=b"x" * (MAX_BODY_BYTES + 1),
                              headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    r = await app_client.get("/api/v1/tariffs")
    assert (r.status_code, r.json()) == (200, [])  # nothing stored, the app still answers

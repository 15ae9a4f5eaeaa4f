"""Helpers for tests that drive a hub: payload builders, configs, waiting.

Not used by the running hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from hub.config import HubConfig
from protocol.anomaly import CARD_METADATA_KEY, ModelCard, card_json
from protocol.schema import EventV1, TelemetryV1, Value, decode_event, decode_telemetry, encode_telemetry_v1

ReadingTuple = tuple[str, str, int, int, Value, str, str]
"""(device, metric, seq, ts_ms, value, unit, quality), as :func:`encode_telemetry_v1` takes."""

T0 = 1_764_079_200_000
"""A fixed reading time (2025-11-25T14:00:00Z) for reproducible tests."""


def telemetry_payload(site: str, gateway: str, readings: Sequence[ReadingTuple],
                      kinds: dict[str, str] | None = None, backlog: int = 0, sent_at: int | None = None) -> bytes:
    """A v1 telemetry payload; every device in ``readings`` is declared (kind from ``kinds``,
    default ``boiler``)."""
    devices = {r[0]: ((kinds or {}).get(r[0], "boiler"), f"sim-{(kinds or {}).get(r[0], 'boiler')}")
               for r in readings}
    return encode_telemetry_v1(site, gateway, sent_at if sent_at is not None else T0, devices, list(readings),
                               backlog=backlog)


def telemetry(site: str, gateway: str, readings: Sequence[ReadingTuple], **kw: Any) -> TelemetryV1:
    """Like :func:`telemetry_payload` but validated into a :class:`TelemetryV1`."""
    return decode_telemetry(telemetry_payload(site, gateway, readings, **kw))


def event_payload(site: str, gateway: str, type: str, ts: int = T0, *, readings_dropped: int = 0,
                  message: str = "", details: dict[str, Any] | None = None, device: str | None = None) -> bytes:
    """A v1 event payload (compact JSON, as a gateway sends it); ``device`` only when given."""
    doc: dict[str, Any] = {"v": 1, "site": site, "gateway": gateway, "ts": ts, "type": type, "message": message,
                           "readings_dropped": readings_dropped, "details": details or {}}
    if device is not None:
        doc["device"] = device
    return json.dumps(doc, separators=(",", ":")).encode()


def event(site: str, gateway: str, type: str, ts: int = T0, **kw: Any) -> EventV1:
    """Like :func:`event_payload` but validated into an :class:`EventV1`."""
    return decode_event(event_payload(site, gateway, type, ts, **kw))


def series(device: str, metric: str, n: int, *, seq0: int = 0, ts0: int = T0, step_ms: int = 1000,
           value0: float = 0.0, unit: str = "degC") -> list[ReadingTuple]:
    """``n`` good readings of one metric: seq ``seq0..``, value ``value0 + i``."""
    return [(device, metric, seq0 + i, ts0 + i * step_ms, value0 + i, unit, "good") for i in range(n)]


def hub_config(*, db_url: str, mqtt_port: int, client_id: str = "twin-hub", share_group: str | None = None,
               **sections: dict[str, Any]) -> HubConfig:
    """A config for an in-process hub: HTTP on a free port, short batch delay."""
    data: dict[str, Any] = {
        "database": {"url": db_url},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": client_id, "share_group": share_group,
                 "reconnect_max_s": 1.0},
        "http": {"host": "127.0.0.1", "port": 0},
        "ingest": {"batch_max_delay_ms": 20},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return HubConfig.model_validate(data)


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms; ``AssertionError`` naming ``what`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def model_card(name: str = "sim-boiler-anomaly", version: int = 1, profile: str = "sim-boiler", *,
               inputs: Sequence[tuple[str, str]] = (("flow_temp", "degC"), ("return_temp", "degC"),
                                                     ("pressure", "bar")),
               window: int = 8, **fields: Any) -> ModelCard:
    """A valid model card (no sha256: as embedded in an ONNX file)."""
    doc: dict[str, Any] = {
        "name": name, "version": version, "profile": profile,
        "inputs": [{"metric": m, "unit": u} for m, u in inputs], "window": window, "sample_period_s": 1.0,
        "threshold": 2.5, "method": "mean of the window (test model)", "training_data": "none",
        "quality": {"f1": 0.9}, "created": "2025-11-25T14:00:00Z", "opset": 17, "seed": 1,
    }
    doc.update(fields)
    return ModelCard.model_validate(doc)


def onnx_model(card: ModelCard | None, *, features: int | None = None, window: int | str | None = None,
               input_name: str = "window", output_name: str = "score", scale: float = 1.0,
               metadata: dict[str, str] | None = None, output_rank: int = 1) -> bytes:
    """An ONNX model file built with ``onnx.helper``: input ``window`` float32 [N, W, F], output
    ``score`` float32 [N] = ``scale`` * sum over the window of the mean over the features.

    ``card`` goes into the metadata property ``twin.card`` (unless ``metadata`` replaces all
    properties); ``features`` / ``window`` / names / ``output_rank`` override what the card implies,
    to build mismatching files; another ``scale`` gives other bytes for the same card.
    """
    import onnx
    from onnx import TensorProto, helper

    f = features if features is not None else (len(card.inputs) if card else 3)
    w = window if window is not None else (card.window if card else 8)
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", w, f])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N"] if output_rank == 1 else ["N", 1])
    nodes = [
        # opset 17: ReduceMean takes axes as an attribute, ReduceSum as an input
        helper.make_node("ReduceMean", [input_name], ["per_sample"], axes=[2], keepdims=0),  # [N, W]
        helper.make_node("ReduceSum", ["per_sample", "sum_axes"], ["total"],
                         keepdims=0 if output_rank == 1 else 1),  # [N] (or [N, 1])
        helper.make_node("Mul", ["total", "scale"], [output_name]),
    ]
    initializers = [helper.make_tensor("sum_axes", TensorProto.INT64, [1], [1]),
                    helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
    graph = helper.make_graph(nodes, "twin-test-score", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="twin-tests")
    model.ir_version = 8  # within what every supported onnxruntime reads
    props = metadata if metadata is not None else ({CARD_METADATA_KEY: card_json(card)} if card else {})
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# -- signing in -------------------------------------------------------------------------------

ADMIN_PASSWORD = "admin-password-for-tests"
"""``TWIN_ADMIN_PASSWORD`` of every hub the tests start (set in conftest): the ``admin`` user."""


class BearerAuth(httpx.Auth):
    """httpx auth that signs in (OAuth2 password flow) on first use and sends the bearer token;
    signs in again once when a request gets 401 (expired token)."""

    requires_response_body = True

    def __init__(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> None:
        self.username = username
        self.password = password
        self.token: str | None = None

    def _login(self, request: httpx.Request) -> httpx.Request:
        return httpx.Request("POST", request.url.copy_with(path="/api/v1/auth/token", query=None),
                             data={"username": self.username, "password": self.password})

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        for attempt in range(2):
            if self.token is None:
                answer = yield self._login(request)
                if answer.status_code != 200:
                    raise AssertionError(f"sign-in as {self.username!r} failed: {answer.status_code} {answer.text}")
                self.token = answer.json()["access_token"]
            request.headers["Authorization"] = f"Bearer {self.token}"
            response = yield request
            if response.status_code != 401 or attempt == 1:
                return
            self.token = None


ADMIN = BearerAuth()
"""Shared admin sign-in for tests that talk to hubs started with :data:`ADMIN_PASSWORD`."""


def admin_auth() -> BearerAuth:
    """A fresh admin sign-in (one per hub: tokens of one hub's secret do not open another)."""
    return BearerAuth()


ROLE_PASSWORDS = {role: f"{role}-password-123" for role in ("admin", "staff", "technician", "viewer")}
"""Passwords of :func:`database_with_role_users`' users, each named after its role."""


@contextlib.asynccontextmanager
async def database_with_role_users(path: Path) -> AsyncIterator[Any]:
    """An open SQLite :class:`hub.db.Database` at ``path`` with one user per role, named after it
    (passwords :data:`ROLE_PASSWORDS`); closed afterwards."""
    from hub.db import Database  # tests only

    database = await Database(f"sqlite://{path}").open()
    try:
        for role, password in ROLE_PASSWORDS.items():
            await add_user(database, role, role, password)
        yield database
    finally:
        await database.close()


def api_app(db: Any, **auth: object) -> Any:
    """The hub's FastAPI app on ``db`` with the data clock at :data:`T0` and ``AuthState(**auth)``."""
    from hub.api import ApiContext, create_app  # tests only
    from hub.api.access import AuthState

    return create_app(ApiContext(db=db, clock=lambda: T0, auth=AuthState(**auth)))  # type: ignore[arg-type]


async def add_user(db: Any, username: str, role: str, password: str | None = None) -> str:
    """Create a user directly in ``db`` (an open :class:`hub.db.Database`); returns the password."""
    from hub import users  # tests only

    password = password or f"{username}-password-1"
    with db.activate():
        await users.create_user(username, users.hash_password(password), users.Role(role), T0, "test")
    return password

"""Which model scores each device profile: local configuration, hub assignments, rollbacks.

At start, a profile runs the model recorded in ``<model_dir>/active.json`` (the last one the hub
assigned and this gateway accepted), else its ``[[models]]`` entry from the configuration; the
local model is loaded as well when configured, as the fallback. Neither needs the hub.

The hub publishes the complete list of models this gateway must run, retained, on
``twin/v1/{site}/{gateway}/models``. For each item whose (profile, sha256) differs from what runs:

    download (size-limited, timed out, http/https only) → verify SHA-256 → load and check
    (card, signature, trial run) → self-test on the profile's current windows (finite scores)
    → store as ``<model_dir>/<sha256>.onnx`` (temp file, fsync, rename) → switch (one assignment
    on the event loop) → ``active.json`` (atomic) → ``model_activated`` event, status ``active``

Any failure keeps the running model and emits ``model_rejected``, and the status reports the
profile ``failed`` with the reason. A file that failed on its content (corrupt, wrong shape or
card, non-finite self-test or live scores) is never tried again (its hash is remembered in
``active.json``); a transfer failure (HTTP error, timeout, truncated, hash mismatch) is retried
with back-off while the assignment stands, and whenever the assignment is delivered again.

A profile missing from an assignment goes back to its local model, or stops being scored. A model
that fails live (raises, non-finite scores) is rolled back to the one it replaced, which stays
loaded until the next successful switch (``model_rolled_back``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge import __version__
from edge.inference.runtime import AnomalyModel, ModelLoadError, ScoringEngine
from edge.inference.scorer import AnomalyScorer, EventSink
from edge.metrics import EdgeMetrics
from protocol.anomaly import MAX_MODEL_BYTES
from protocol.logs import get_logger
from protocol.schema import (
    ActiveModelV1,
    EventType,
    ModelAssignmentItemV1,
    ModelAssignmentV1,
    ModelState,
    SchemaError,
    decode_model_assignment,
)

log = get_logger("edge.rollout")

ACTIVE_FILE = "active.json"
TRANSIENT_KINDS = frozenset({"download", "sha256", "store"})
"""Failures of the transfer, not of the file's content: worth another try later."""
MAX_REFUSED = 64
_MODEL_FILE = re.compile(r"^[0-9a-f]{64}\.onnx$")


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shown_url(url: str) -> str:
    """``url`` without its query string, for logs and error messages: the hub's download URLs carry
    the gateway's access capability there (``?access=...``), which is a credential."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl() if parts.query else url


def download(url: str, limit: int, timeout_s: float, tls_context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` (http or https only), at most ``limit`` bytes, within ``timeout_s`` in total;
    an https server's certificate is verified with ``tls_context`` (default: the system's trust store).

    Raises :class:`ModelLoadError` of kind ``download`` (a transfer problem, worth retrying).
    Blocking: run it in a thread.
    """
    shown = shown_url(url)
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ModelLoadError(shown, "download", f"only http and https URLs are fetched, not {scheme or 'a relative'!r}")
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": f"twin-edge/{__version__}"})
    chunks: list[bytes] = []
    total = 0
    try:
        with urllib.request.urlopen(request, timeout=min(timeout_s, 30.0), context=tls_context) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise ModelLoadError(shown, "download", f"the server sends {length} bytes, more than the {limit} "
                                                      f"expected")
            while True:
                if time.monotonic() > deadline:
                    raise ModelLoadError(shown, "download", f"download did not finish within {timeout_s:g} s "
                                                          f"({total} bytes received)")
                chunk = resp.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise ModelLoadError(shown, "download", f"the server sent more than the {limit} bytes expected")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise ModelLoadError(shown, "download", f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ModelLoadError(shown, "download", f"cannot fetch: {exc.reason}") from None
    except TimeoutError:
        raise ModelLoadError(shown, "download", f"timed out after {timeout_s:g} s ({total} bytes received)") from None
    except OSError as exc:
        raise ModelLoadError(shown, "download", f"transfer failed: {exc}") from None
    return b"".join(chunks)


@dataclass(frozen=True)
class _Failure:
    """The last model assigned to (or running for) a profile that could not be used."""

    name: str
    version: int
    sha256: str
    error: str


class ModelRollout:
    """Keeps each profile's model in line with the configuration, ``active.json`` and the hub."""

    def __init__(self, scorer: AnomalyScorer, engine: ScoringEngine, events: EventSink, metrics: EdgeMetrics, *,
                 site: str, gateway: str, model_dir: Path, local_models: dict[str, Path] | None = None,
                 hub_url: str | None = None, download_timeout_s: float = 60.0,
                 tls_context: ssl.SSLContext | None = None,
                 retry_min_s: float = 30.0, retry_max_s: float = 1800.0) -> None:
        self.scorer = scorer
        self.engine = engine
        self.events = events
        self.metrics = metrics
        self.site = site
        self.gateway = gateway
        self.model_dir = model_dir
        self.local_paths = dict(local_models or {})
        self.hub_url = hub_url
        self.download_timeout_s = download_timeout_s
        self.tls_context = tls_context
        """Verifies an https hub when downloading models (``[inference] ca_file``)."""
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.on_status_change: Callable[[], None] | None = None
        """Called when :meth:`status` changed (the uplink re-publishes the retained status)."""
        self.local: dict[str, AnomalyModel] = {}
        self.failures: dict[str, _Failure] = {}
        self.refused: dict[str, str] = {}
        """SHA-256 → why: files that failed on their content, never tried again."""
        self._reported: set[tuple[str, str]] = set()  # (sha256, reason) already sent as model_rejected
        self._latest: ModelAssignmentV1 | None = None
        self._wake = asyncio.Event()
        self.started = asyncio.Event()
        self.applied = 0
        """Assignments processed (tests wait on it)."""
        self._retry_delay = retry_min_s
        scorer.on_failure = self.rollback

    @property
    def active_path(self) -> Path:
        """``<model_dir>/active.json``."""
        return self.model_dir / ACTIVE_FILE

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, ActiveModelV1]:
        """Profile → the model this gateway runs for it (``StatusV1.models``)."""
        out: dict[str, ActiveModelV1] = {}
        for profile in sorted(set(self.scorer.by_profile)):
            model = self.scorer.active(profile)
            failure = self.failures.get(profile)
            if model is not None:
                c = model.card
                out[profile] = ActiveModelV1(name=c.name, version=c.version, sha256=model.sha256,
                                             state=ModelState.FAILED if failure else ModelState.ACTIVE,
                                             error=_short(failure.error) if failure else "")
            elif failure is not None:
                out[profile] = ActiveModelV1(name=failure.name, version=failure.version, sha256=failure.sha256,
                                             state=ModelState.FAILED, error=_short(failure.error))
        return out

    def _changed(self) -> None:
        if self.on_status_change is not None:
            self.on_status_change()

    # -- persistence -----------------------------------------------------------------------

    def _read_active(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.active_path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or not isinstance(doc.get("models", {}), dict):
                raise ValueError("not an object with a 'models' object")
            return doc
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("model_active_file_unreadable", path=str(self.active_path), error=str(exc),
                      effect="starting from the configured models")
            return {}

    def _active_doc(self) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        for profile in sorted(self.scorer.by_profile):
            model = self.scorer.active(profile)
            if model is not None and model is not self.local.get(profile):
                models[profile] = {"name": model.card.name, "version": model.card.version, "sha256": model.sha256,
                                   "file": f"{model.sha256}.onnx"}
        return {"v": 1, "models": models, "refused": dict(list(self.refused.items())[-MAX_REFUSED:])}

    async def _persist(self) -> None:
        """Write ``active.json`` (atomically) and delete model files nothing refers to any more."""
        doc = self._active_doc()
        keep = {f"{m.sha256}.onnx" for p in self.scorer.by_profile
                for m in (self.scorer.active(p), self.scorer.previous(p)) if m is not None}

        def write() -> None:
            write_atomic(self.active_path, (json.dumps(doc, indent=2) + "\n").encode())
            for f in self.model_dir.iterdir():
                if (_MODEL_FILE.match(f.name) and f.name not in keep) or f.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        f.unlink()
        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            log.error("model_active_file_not_written", path=str(self.active_path), error=str(exc),
                      effect="after a restart the previous choice of models is used")

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the local models and those ``active.json`` names; a failure only costs scoring."""
        try:
            await self._start()
        finally:
            self.started.set()
            self._changed()

    async def _start(self) -> None:
        doc = self._read_active()
        self.refused.update({k: str(v) for k, v in dict(doc.get("refused", {})).items()})
        for profile, path in self.local_paths.items():
            if profile not in self.scorer.by_profile:
                log.warning("model_ignored", profile=profile, path=str(path), reason="no device has this profile")
                continue
            try:
                model = await self.engine.load_file(path, profile=profile)
                self.scorer.check_model(model, profile)
            except ModelLoadError as exc:
                await self._load_failed(profile, exc, source="local")
                continue
            self.local[profile] = model
            self.scorer.activate(profile, model)
            log.info("model_loaded", profile=profile, model=model.label, sha256=model.sha256, source="local",
                     path=str(path))
        for profile, entry in dict(doc.get("models", {})).items():
            if profile not in self.scorer.by_profile:
                continue
            try:
                sha = str(entry["sha256"])
                path = self.model_dir / f"{sha}.onnx"
                model = await self.engine.load_file(path, expected_sha256=sha, profile=profile)
                self.scorer.check_model(model, profile)
            except (KeyError, TypeError):
                log.error("model_active_file_unreadable", path=str(self.active_path), profile=profile,
                          error="entry without sha256")
                continue
            except ModelLoadError as exc:
                await self._load_failed(profile, exc, source="active.json")
                continue
            self.scorer.activate(profile, model)
            log.info("model_loaded", profile=profile, model=model.label, sha256=model.sha256, source="hub",
                     path=str(path))

    async def _load_failed(self, profile: str, exc: ModelLoadError, source: str) -> None:
        self.metrics.model_load_failures.labels(profile, exc.kind).inc()
        log.error("model_load_failed", profile=profile, file=exc.source, kind=exc.kind, reason=exc.reason,
                  source=source, effect=f"devices of profile {profile} are not scored by this model")
        await self.events.add_event(EventType.MODEL_REJECTED.value, _short(str(exc), 1000),
                                    {"profile": profile, "source": source, "kind": exc.kind, "file": exc.source})

    def devices_changed(self) -> None:
        """The gateway's devices changed (remote configuration): apply the last assignment again, so
        a profile that is new on this gateway gets its model and the status lists the right profiles."""
        if self._latest is not None:
            self._wake.set()
        self._changed()

    # -- assignments -----------------------------------------------------------------------

    def handle_assignment(self, payload: bytes) -> None:
        """Take a message from the models topic (called by the uplink; returns at once)."""
        if not payload:
            # The retained message was deleted: no news, so the models that run stay.
            log.info("model_assignment_cleared", effect="keeping the running models")
            return
        try:
            assignment = decode_model_assignment(payload, expect_version=1)
        except SchemaError as exc:
            log.error("model_assignment_malformed", error=str(exc))
            return
        if (assignment.site, assignment.gateway) != (self.site, self.gateway):
            log.error("model_assignment_misaddressed", site=assignment.site, gateway=assignment.gateway)
            return
        self._latest = assignment
        self._wake.set()

    async def run(self) -> None:
        """Start, then apply assignments as they come (and retry transfers that failed)."""
        try:
            await self.start()
        except Exception as exc:  # data collection goes on; the hub may still assign models
            log.exception("model_start_failed", error=repr(exc))
        retry_at: float | None = None
        self._retry_delay = self.retry_min_s
        while True:
            timeout = None if retry_at is None else max(0.0, retry_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            assignment = self._latest
            if assignment is None:
                continue
            try:
                transient = await self.apply(assignment)
            except Exception as exc:  # a bug here must not end rollout (nor the agent)
                log.exception("model_assignment_failed", error=repr(exc))
                transient = True
            if transient:
                retry_at = time.monotonic() + self._retry_delay
                log.info("model_download_retry_scheduled", in_s=round(self._retry_delay, 1))
                self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)
            else:
                retry_at = None
                self._retry_delay = self.retry_min_s

    async def apply(self, assignment: ModelAssignmentV1) -> bool:
        """Bring every profile in line with ``assignment``; True if a transfer failed (retry later)."""
        items = {i.profile: i for i in assignment.models}
        transient = False
        for profile, item in items.items():
            if profile not in self.scorer.by_profile:
                log.info("model_assignment_ignored", profile=profile, model=f"{item.name} v{item.version}",
                         reason="no device on this gateway has this profile")
                continue
            transient |= await self._apply_item(item)
        for profile in sorted(self.scorer.by_profile):
            if profile not in items:
                await self._unassigned(profile)
        self.applied += 1
        return transient

    async def _apply_item(self, item: ModelAssignmentItemV1) -> bool:
        profile = item.profile
        running = self.scorer.active(profile)
        if running is not None and running.sha256 == item.sha256:
            if self.failures.pop(profile, None) is not None:
                self._changed()
            return False
        if item.sha256 in self.refused:
            failure = _Failure(item.name, item.version, item.sha256, self.refused[item.sha256])
            if self.failures.get(profile) != failure:
                self.failures[profile] = failure
                self._changed()
            log.info("model_assignment_refused_before", profile=profile, sha256=item.sha256,
                     reason=self.refused[item.sha256])
            return False
        try:
            model, data = await self._fetch(item)
            if (model.card.name, model.card.version) != (item.name, item.version):
                raise ModelLoadError(model.source, "card", f"the file's card is {model.label}, the assignment says "
                                                           f"{item.name} v{item.version}")
            self.scorer.check_model(model, profile)
            await model.self_test(self.scorer.probe_windows(profile, model.card))
            if data is not None:
                try:
                    await asyncio.to_thread(write_atomic, self.model_dir / f"{item.sha256}.onnx", data)
                except OSError as exc:
                    raise ModelLoadError(str(self.model_dir), "store", f"cannot store the model: {exc}") from None
        except ModelLoadError as exc:
            await self._reject(item, exc)
            return exc.kind in TRANSIENT_KINDS
        old = self.scorer.activate(profile, model)
        self.failures.pop(profile, None)
        self.metrics.model_activations.labels(profile).inc()
        await self._persist()
        log.info("model_activated", profile=profile, model=model.label, sha256=model.sha256,
                 replaced=old.label if old else None)
        await self.events.add_event(
            EventType.MODEL_ACTIVATED.value,
            f"{model.label} scores profile {profile}" + (f" (replacing {old.label})" if old else ""),
            {"profile": profile, "model": model.card.name, "version": model.card.version, "sha256": model.sha256,
             "previous_version": old.card.version if old else 0})
        self._changed()
        return False

    async def _fetch(self, item: ModelAssignmentItemV1) -> tuple[AnomalyModel, bytes | None]:
        """The model of ``item``: from ``model_dir`` if a copy is there, else downloaded (then also
        returns the bytes, to be stored once it passed its self-test)."""
        cached = self.model_dir / f"{item.sha256}.onnx"
        if cached.exists():
            try:
                return await self.engine.load_file(cached, expected_sha256=item.sha256, profile=item.profile), None
            except ModelLoadError as exc:
                log.warning("model_cached_copy_unusable", file=str(cached), error=exc.reason)
        if item.size > MAX_MODEL_BYTES:
            raise ModelLoadError(shown_url(item.url), "too-big", f"the assignment announces {item.size} bytes, "
                                                                 f"more than the {MAX_MODEL_BYTES} a model may have")
        url = item.url
        if urlsplit(url).scheme == "" and url.startswith("/"):
            if self.hub_url is None:
                raise ModelLoadError(shown_url(url), "download",
                                     "the URL is a path and no [inference] hub_url is configured")
            url = self.hub_url.rstrip("/") + url  # as the hub builds it: public_url + path
        shown = shown_url(url)
        log.info("model_download_started", profile=item.profile, model=f"{item.name} v{item.version}", url=shown,
                 size=item.size)
        data = await asyncio.to_thread(download, url, item.size, self.download_timeout_s, self.tls_context)
        if len(data) != item.size:
            raise ModelLoadError(shown, "download", f"got {len(data)} bytes, the assignment announced {item.size}")
        return await self.engine.load(data, shown, expected_sha256=item.sha256, profile=item.profile), data

    async def _reject(self, item: ModelAssignmentItemV1, exc: ModelLoadError) -> None:
        profile = item.profile
        reason = f"{item.name} v{item.version} refused ({exc.kind}): {exc}"
        if exc.kind not in TRANSIENT_KINDS:
            self.refused[item.sha256] = reason
            await self._persist()
        self.failures[profile] = _Failure(item.name, item.version, item.sha256, reason)
        self.metrics.model_load_failures.labels(profile, exc.kind).inc()
        running = self.scorer.active(profile)
        log.error("model_rejected", profile=profile, model=f"{item.name} v{item.version}", sha256=item.sha256,
                  kind=exc.kind, reason=exc.reason, file=exc.source, keeps=running.label if running else None)
        if (item.sha256, reason) not in self._reported:
            self._reported.add((item.sha256, reason))
            await self.events.add_event(
                EventType.MODEL_REJECTED.value, _short(reason, 1000),
                {"profile": profile, "model": item.name, "version": item.version, "sha256": item.sha256,
                 "kind": exc.kind, "running_version": running.card.version if running else 0})
        self._changed()

    async def _unassigned(self, profile: str) -> None:
        """The hub assigns nothing to ``profile``: its local model, or no scoring."""
        changed = self.failures.pop(profile, None) is not None
        running = self.scorer.active(profile)
        local = self.local.get(profile)
        if running is not None and running is not local:
            if local is not None and local.failed is None:
                self.scorer.activate(profile, local)
                self.metrics.model_activations.labels(profile).inc()
                log.info("model_activated", profile=profile, model=local.label, source="local",
                         reason="the hub no longer assigns a model to this profile")
                await self.events.add_event(
                    EventType.MODEL_ACTIVATED.value,
                    f"{local.label} (local) scores profile {profile} again: the hub no longer assigns one",
                    {"profile": profile, "model": local.card.name, "version": local.card.version,
                     "sha256": local.sha256, "previous_version": running.card.version})
            else:
                log.info("model_scoring_stopped", profile=profile, model=running.label,
                         reason="the hub no longer assigns a model and none is configured locally")
                await self.scorer.deactivate(profile, "the hub no longer assigns a model")
            await self._persist()
            changed = True
        if changed:
            self._changed()

    # -- live failures ---------------------------------------------------------------------

    async def rollback(self, profile: str, model: AnomalyModel, reason: str) -> None:
        """An active model failed live: restore the one it replaced (or stop scoring the profile)."""
        self.refused[model.sha256] = f"{model.label} rolled back: {reason}"
        self.metrics.model_rollbacks.labels(profile).inc()
        restored = self.scorer.restore_previous(profile)
        if restored is None:
            await self.scorer.deactivate(profile, f"{model.label} failed")
            message = f"{model.label} failed live ({reason}); no previous version: profile {profile} is not scored"
        else:
            message = f"{model.label} failed live ({reason}); rolled back to {restored.label}"
        self.failures[profile] = _Failure(model.card.name, model.card.version, model.sha256,
                                          f"{model.label} rolled back: {reason}")
        log.error("model_rolled_back", profile=profile, model=model.label, sha256=model.sha256, reason=reason,
                  restored=restored.label if restored else None)
        await self._persist()
        await self.events.add_event(
            EventType.MODEL_ROLLED_BACK.value, _short(message, 1000),
            {"profile": profile, "model": model.card.name, "version": model.card.version, "sha256": model.sha256,
             "restored_version": restored.card.version if restored else 0, "reason": _short(reason, 300)})
        self._changed()

"""Structured logging set-up shared by every process (edge agent, hub, simulators).

One JSON object per line on stderr when not on a terminal (what journald, Loki or a log shipper
want), readable ``key=value`` lines on a terminal. Everything goes through the standard
``logging`` module too, so library logs (pymodbus, uvicorn, tortoise) land in the same stream.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Defence in depth: no code path is meant to log a secret, but a future ``log.info(..., password=p)``
# must not leak one either. A field is masked when its name contains one of these parts (any case:
# ``mqtt_password``, ``token_secret``, ``access_token``, ``Authorization``) or is one of the exact
# names (``code`` alone is a claim code; ``function_code`` or ``status_code`` stay visible).
_SECRET_PARTS = ("password", "passwd", "secret", "token", "authorization", "api_key", "apikey", "cookie",
                 "credential", "private_key")
_SECRET_NAMES = frozenset({"code", "claim_code", "pin"})
# Greedy up to the last "@" before the host: a password may itself contain "@".
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^/\s]*@")
_secret_key_cache: dict[str, bool] = {}
MASK = "***"


def is_secret_key(key: str) -> bool:
    """Whether a log field of this name is masked (cached: log keys are a small, fixed set)."""
    hit = _secret_key_cache.get(key)
    if hit is None:
        low = key.lower()
        hit = low in _SECRET_NAMES or any(part in low for part in _SECRET_PARTS)
        if len(_secret_key_cache) < 4096:  # keys come from code, but keep the cache bounded anyway
            _secret_key_cache[key] = hit
    return hit


def redact_text(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` URL replaced by ``***``."""
    return _URL_USERINFO.sub(rf"\g<scheme>\g<user>:{MASK}@", text) if "@" in text else text


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask secret-named fields (one level into dict values too) and URL
    passwords in string values. Cheap: a cached name check per field, a regex only on strings
    holding an ``@``."""
    for key, value in event.items():
        if is_secret_key(key):
            if value is not None:
                event[key] = MASK
        elif isinstance(value, str):
            if "@" in value:
                event[key] = redact_text(value)
        elif isinstance(value, dict):
            event[key] = {k: (MASK if v is not None and isinstance(k, str) and is_secret_key(k)
                              else redact_text(v) if isinstance(v, str) else v) for k, v in value.items()}
    return event


def _redact_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """URL passwords out of a formatted traceback (a driver's error may quote the URL)."""
    exc = event.get("exception")
    if isinstance(exc, str):
        event["exception"] = redact_text(exc)
    return event


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record, not at configuration.

    A process that swaps stderr (pytest's capture, a daemon redirecting it) would otherwise leave
    the handler on a closed stream, and every later record from any thread would fail to print.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    """Configure structlog and stdlib logging; ``json=None`` picks JSON unless stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _redact_exception, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pymodbus logs every failed request at ERROR on its own; we count and log those ourselves.
    logging.getLogger("pymodbus").setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``name``."""
    return structlog.get_logger(name)

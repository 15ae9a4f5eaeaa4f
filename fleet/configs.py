"""Write the edge and hub configuration files of a local fleet (demo, tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "models" / "shipped"
"""Where the project's trained anomaly models live (``python -m models.train sim`` writes them)."""


def shipped_models() -> dict[str, Path]:
    """Profile -> shipped anomaly model file, for the simulator profiles."""
    return {p: SHIPPED_MODELS / f"{p}-anomaly.onnx" for p in ("sim-boiler", "sim-meter")}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(name: str, values: dict[str, Any]) -> str:
    body = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)
    return f"[{name}]\n{body}\n"


def device_tables(devices: list[dict[str, Any]], poll_interval_s: float) -> list[dict[str, Any]]:
    """``[[devices]]`` entries (as dicts) for devices as listed in ``twin-sim``'s ready line."""
    return [{"name": d["name"], "profile": d["profile"], "transport": "tcp", "host": d["host"], "port": d["port"],
             "unit_id": d.get("unit_id", 1), "poll_interval_s": poll_interval_s} for d in devices]


def write_edge_config(path: Path, *, site: str, gateway: str, mqtt_port: int, devices: list[dict[str, Any]],
                      poll_interval_s: float = 1.0, buffer_path: Path | None = None, metrics_port: int = 0,
                      mqtt: dict[str, Any] | None = None, buffer: dict[str, Any] | None = None,
                      log_level: str = "INFO", models: dict[str, Path] | None = None,
                      inference: dict[str, Any] | None = None) -> Path:
    """An ``edge.toml`` for ``devices`` as listed in ``twin-sim``'s ready line.

    ``models`` maps a device profile to a local anomaly model file (``[[models]]``).
    """
    text = f'log_level = "{log_level}"\n\n'
    text += _table("gateway", {"site": site, "name": gateway})
    text += _table("mqtt", {"host": "127.0.0.1", "port": mqtt_port, **(mqtt or {})})
    text += _table("buffer", {"path": str(buffer_path or path.parent / "edge-buffer.db"), **(buffer or {})})
    text += _table("metrics", {"host": "127.0.0.1", "port": metrics_port})
    if inference:
        text += _table("inference", inference)
    for profile, model_path in (models or {}).items():
        text += "[[models]]\n" + f"profile = {_toml_value(profile)}\npath = {_toml_value(str(model_path))}\n\n"
    for d in device_tables(devices, poll_interval_s):
        text += "[[devices]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in d.items()) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_hub_config(path: Path, *, database_url: str, mqtt_port: int, http_port: int,
                     client_id: str = "twin-hub", share_group: str | None = None,
                     log_level: str = "INFO", extra: dict[str, dict[str, Any]] | None = None,
                     mqtt: dict[str, Any] | None = None) -> Path:
    """A ``hub.toml`` for a local fleet; ``mqtt`` adds keys to ``[mqtt]`` (e.g. the hub's broker login)."""
    text = f'log_level = "{log_level}"\n\n'
    text += _table("database", {"url": database_url})
    text += _table("mqtt", {"host": "127.0.0.1", "port": mqtt_port, "client_id": client_id,
                            "share_group": share_group, **(mqtt or {})})
    text += _table("http", {"host": "127.0.0.1", "port": http_port})
    for section, values in (extra or {}).items():
        text += _table(section, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path

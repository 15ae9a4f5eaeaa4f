"""The contract between a trained anomaly model, the edge that runs it and the hub that rolls it out.

A model is one ONNX file. Its graph takes ``window``, float32 ``[batch, window, len(inputs)]``: the
last ``window`` samples of the device's ``inputs`` metrics, oldest first, in the card's order and
units, as the gateway read them (no scaling: the graph does its own). It returns ``score``, float32
``[batch]``: larger is more anomalous, and a sample is anomalous when ``score > threshold``.

The model card travels inside the file as the ONNX metadata property :data:`CARD_METADATA_KEY`
(everything but ``sha256``, which cannot be part of what it hashes) and beside it as
``<file>.card.json`` (with ``sha256``). Training code writes it; the edge checks a file against it
before scoring anything; the hub stores it with the model version.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from protocol.ids import Name
from protocol.units import Unit

INPUT_NAME = "window"
OUTPUT_NAME = "score"
CARD_METADATA_KEY = "twin.card"
CARD_SUFFIX = ".card.json"
MAX_MODEL_BYTES = 2 * 1024 * 1024
"""Largest model file the project ships or the hub accepts: it has to travel to a Pi over a thin link."""

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ModelInput(BaseModel):
    """One input feature: a metric of the device, in the unit the model was trained on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Name
    unit: Unit


class ModelCard(BaseModel):
    """What a model is, what it eats, when it alarms and how well it measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    """Model family name, e.g. ``sim-boiler-anomaly``; versions of one name replace each other."""
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]  # the hub stores it in a 32-bit integer column
    profile: Name
    """Device profile whose devices the model scores (``sim-boiler``); ``*`` is not allowed."""
    inputs: Annotated[list[ModelInput], Field(min_length=1, max_length=64)]
    window: Annotated[int, Field(ge=1, le=4096)]
    """Samples per window."""
    sample_period_s: Annotated[float, Field(gt=0)]
    """Spacing of the samples the model was trained on; the edge warns when it polls much slower."""
    threshold: float
    """A window scores anomalous when ``score > threshold``, calibrated on normal data only."""
    clear_threshold: float | None = None
    """Hysteresis: an active anomaly clears when ``score <= clear_threshold`` (default: ``threshold``)."""
    method: str
    """Model family and features, in words."""
    training_data: str
    quality: dict[str, float | int | str] = Field(default_factory=dict)
    """Measured quality, e.g. ``f1``, ``far``, ``mar``, per-fault detection rates."""
    created: str
    """ISO 8601 UTC time the model was built."""
    opset: Annotated[int, Field(ge=7)]
    seed: int = 0
    sha256: Sha256 | None = None
    """SHA-256 of the ONNX file (only in the ``.card.json`` beside it, never inside the file)."""

    @model_validator(mode="after")
    def _distinct_inputs(self) -> ModelCard:
        metrics = [i.metric for i in self.inputs]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"inputs repeat a metric: {metrics}")
        return self

    @property
    def input_metrics(self) -> tuple[str, ...]:
        """The input metrics in feature order."""
        return tuple(i.metric for i in self.inputs)

    @property
    def clear_at(self) -> float:
        """Score at or below which an active anomaly clears."""
        return self.threshold if self.clear_threshold is None else self.clear_threshold


class ModelFileError(ValueError):
    """A model file that cannot be used: missing, unreadable, too big, or not matching its card."""


def import_onnxruntime() -> Any:
    """Import onnxruntime with its telemetry off.

    Since 1.29 onnxruntime's own telemetry is on by default on Linux too: at import it writes a
    cache database under ``~/.cache/Microsoft`` and tries to reach Microsoft's collector. A gateway
    beside a plant must not open connections nobody configured (and it saves ~2 MB of RSS).
    ``ORT_DISABLE_TELEMETRY`` must be set before the first import; an explicit setting wins.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def card_from_metadata(metadata: dict[str, str], source: str) -> ModelCard:
    """Read the card embedded in an ONNX model's metadata; :class:`ModelFileError` if absent or invalid."""
    raw = metadata.get(CARD_METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{source}: no model card (metadata property {CARD_METADATA_KEY!r} missing)")
    try:
        return ModelCard.model_validate_json(raw)
    except ValidationError as exc:
        raise ModelFileError(f"{source}: invalid model card: {exc}") from None


def card_path(model_path: Path) -> Path:
    """Where the ``.card.json`` of ``model_path`` lives."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + CARD_SUFFIX)


def card_json(card: ModelCard) -> str:
    """The card as stable, human-diffable JSON."""
    data: dict[str, Any] = card.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, indent=2, sort_keys=False) + "\n"

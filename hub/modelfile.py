"""Checking an uploaded anomaly-model file before the hub stores it (see ``protocol.anomaly``).

The hub loads the file with onnxruntime (a runtime dependency; the ``onnx`` package is only in
the ``train`` extra): that proves the file is an ONNX model the edge's runtime can load, gives
the metadata holding the model card, and the graph's inputs and outputs to check against the
card. A final run on a window of zeros proves the graph executes and returns one score per window.

:func:`inspect_model` is CPU-bound and blocking (a few ms to a few hundred ms); the API runs it in
a thread (``asyncio.to_thread``) so the event loop keeps serving ingest and other requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from hub.errors import RequestRefused
from protocol.anomaly import (
    CARD_METADATA_KEY,
    INPUT_NAME,
    MAX_MODEL_BYTES,
    OUTPUT_NAME,
    ModelCard,
    ModelFileError,
    card_from_metadata,
    import_onnxruntime,
    sha256_of,
)

_FLOAT = "tensor(float)"


class ModelRejected(RequestRefused):
    """An upload the hub refuses (``status``, ``message``: see :class:`RequestRefused`)."""


@dataclass(frozen=True, slots=True)
class CheckedModel:
    """A model file that passed every check, with its card (``sha256`` filled in)."""

    card: ModelCard
    sha256: str
    size: int


def check_size(size: int) -> None:
    """Refuse an empty or too large file (413 / 400) before anything else is done with it."""
    if size > MAX_MODEL_BYTES:
        raise ModelRejected(413, f"model file of {size} bytes exceeds the limit of {MAX_MODEL_BYTES} bytes")
    if size == 0:
        raise ModelRejected(400, "empty body: send the .onnx file as the request body")


def _dims(shape: Any) -> list[int | str | None]:
    return list(shape) if isinstance(shape, list | tuple) else []


def inspect_model(data: bytes) -> CheckedModel:
    """Check ``data`` as a model file; :class:`ModelRejected` says what is wrong. Blocking."""
    check_size(len(data))
    import numpy as np
    ort = import_onnxruntime()  # imported here: only uploads need it, and it is slow to import

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a check, not a workload: no thread pool per upload
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; the reason goes into the response
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelRejected(400, f"not a loadable ONNX model: {_short(exc)}") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    try:
        card = card_from_metadata(metadata, "uploaded model")
    except ModelFileError as exc:
        raise ModelRejected(422, _card_problem(metadata, exc)) from None
    if card.sha256 is not None:
        raise ModelRejected(422, "the embedded model card must not carry sha256 (a file cannot contain its own "
                                 "hash; it belongs in the .card.json beside the file)")

    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ModelRejected(422, f"the model must have exactly one input {INPUT_NAME!r}, it has "
                                 f"{[i.name for i in inputs]}")
    window = inputs[0]
    dims = _dims(window.shape)
    n_features = len(card.inputs)
    if window.type != _FLOAT:
        raise ModelRejected(422, f"input {INPUT_NAME!r} is {window.type}, expected float32 ({_FLOAT})")
    if len(dims) != 3:
        raise ModelRejected(422, f"input {INPUT_NAME!r} has shape {dims}, expected rank 3 "
                                 f"[batch, {card.window}, {n_features}]")
    if dims[2] != n_features:
        raise ModelRejected(422, f"input {INPUT_NAME!r} has {dims[2]} features in its last dimension, the card "
                                 f"lists {n_features} inputs {list(card.input_metrics)}")
    if isinstance(dims[1], int) and dims[1] != card.window:
        raise ModelRejected(422, f"input {INPUT_NAME!r} takes windows of {dims[1]} samples, the card says "
                                 f"window = {card.window}")
    outputs = {o.name: o for o in session.get_outputs()}
    score = outputs.get(OUTPUT_NAME)
    if score is None:
        raise ModelRejected(422, f"the model has no output {OUTPUT_NAME!r} (outputs: {sorted(outputs)})")
    if score.type != _FLOAT:
        raise ModelRejected(422, f"output {OUTPUT_NAME!r} is {score.type}, expected float32 ({_FLOAT})")
    score_dims = _dims(score.shape)
    if len(score_dims) > 1:  # no dims: not declared in the graph; the run below checks the real shape
        raise ModelRejected(422, f"output {OUTPUT_NAME!r} has shape {score_dims}, expected [batch]")

    zeros = np.zeros((1, card.window, n_features), dtype=np.float32)
    try:
        (result,) = session.run([OUTPUT_NAME], {INPUT_NAME: zeros})
    except Exception as exc:
        raise ModelRejected(422, f"the model fails on a window of zeros: {_short(exc)}") from None
    result = np.asarray(result)
    if result.shape != (1,):
        raise ModelRejected(422, f"output {OUTPUT_NAME!r} has shape {list(result.shape)} for one window, "
                                 "expected [1] (one score per window)")
    sha = sha256_of(data)
    return CheckedModel(card.model_copy(update={"sha256": sha}), sha, len(data))


def _card_problem(metadata: dict[str, str], exc: ModelFileError) -> str:
    """A one-line reason for a missing or invalid card (pydantic's own text spans many lines)."""
    raw = metadata.get(CARD_METADATA_KEY)
    if raw is None:
        return f"no model card: the ONNX metadata has no property {CARD_METADATA_KEY!r}"
    try:
        ModelCard.model_validate_json(raw)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in err.errors()[:5]]
        more = f" (and {err.error_count() - 5} more)" if err.error_count() > 5 else ""
        return f"invalid model card in {CARD_METADATA_KEY!r}: " + "; ".join(problems) + more
    return str(exc)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

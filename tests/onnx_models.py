"""Tiny contract-conforming anomaly models built with ``onnx.helper``, for tests.

``make_model(card, kind, ...)`` returns the bytes of an ONNX file that takes ``window`` float32
``[N, card.window, len(card.inputs)]`` and returns ``score`` float32 ``[N]``, with ``card`` embedded
in the metadata property ``twin.card`` (without ``sha256``), as :mod:`protocol.anomaly` requires.
Scores are simple statistics of one input metric over the window, so a test can predict them:

============= =================================================================
``mean-abs``  ``|mean(x) - center| / scale``: a z-score of the window mean
``mean``      ``(mean(x) - center) / scale``
``last``      ``(x[-1] - center) / scale``: the newest sample
``range``     ``(max(x) - min(x) - center) / scale`` (negative ``scale``: flat windows score high)
``constant``  ``value`` for every window
============= =================================================================
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from protocol.anomaly import CARD_METADATA_KEY, INPUT_NAME, OUTPUT_NAME, ModelCard

ModelKind = Literal["mean-abs", "mean", "last", "range", "constant"]


def make_model(
    card: ModelCard,
    kind: ModelKind = "mean-abs",
    *,
    metric: str | None = None,
    center: float = 0.0,
    scale: float = 1.0,
    value: float = 0.0,
    embed_card: bool = True,
) -> bytes:
    """An ONNX model scoring windows of ``card.inputs`` by ``kind`` of ``metric`` (default: the first input).

    ``embed_card=False`` leaves the card out (to test that a model without one is refused).
    """
    if scale == 0:
        raise ValueError("scale must not be 0")
    metrics = card.input_metrics
    feature = metrics.index(metric) if metric is not None else 0
    opset = card.opset
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array([feature], dtype=np.int64), "feature"),
        numpy_helper.from_array(np.array(center, dtype=np.float32), "center"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(value, dtype=np.float32), "value"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_index"),
    ]

    def reduce(op: str, source: str, out: str, axes: str, axes_list: list[int]) -> None:
        # Opset 18 moved the axes of the Reduce* operators from an attribute to an input.
        if opset >= 18:
            nodes.append(helper.make_node(op, [source, axes], [out], keepdims=0))
        else:
            nodes.append(helper.make_node(op, [source], [out], axes=axes_list, keepdims=0))

    def squeeze(source: str, out: str, axes: str, axes_list: list[int]) -> None:
        # Opset 13 did the same for Squeeze.
        if opset >= 13:
            nodes.append(helper.make_node("Squeeze", [source, axes], [out]))
        else:
            nodes.append(helper.make_node("Squeeze", [source], [out], axes=axes_list))

    # x: [N, W, 1] -> [N, W]
    nodes.append(helper.make_node("Gather", [INPUT_NAME, "feature"], ["x3"], axis=2))
    squeeze("x3", "x", "axes2", [2])
    inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axes2"))

    if kind in ("mean-abs", "mean"):
        reduce("ReduceMean", "x", "stat", "axis1", [1])
    elif kind == "last":
        nodes.append(helper.make_node("Gather", ["x", "last_index"], ["last2"], axis=1))
        squeeze("last2", "stat", "axis1", [1])
    elif kind == "range":
        reduce("ReduceMax", "x", "hi", "axis1", [1])
        reduce("ReduceMin", "x", "lo", "axis1", [1])
        nodes.append(helper.make_node("Sub", ["hi", "lo"], ["stat"]))
    elif kind == "constant":
        # value + 0 * mean(window): one score per window whatever its contents.
        reduce("ReduceMean", INPUT_NAME, "all_mean", "axes12", [1, 2])
        nodes.append(helper.make_node("Mul", ["all_mean", "zero"], ["zeros"]))
        nodes.append(helper.make_node("Add", ["zeros", "value"], [OUTPUT_NAME]))
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if kind != "constant":
        nodes.append(helper.make_node("Sub", ["stat", "center"], ["centered"]))
        if kind == "mean-abs":
            nodes.append(helper.make_node("Div", ["centered", "scale"], ["scaled"]))
            nodes.append(helper.make_node("Abs", ["scaled"], [OUTPUT_NAME]))
        else:
            nodes.append(helper.make_node("Div", ["centered", "scale"], [OUTPUT_NAME]))

    used = {name for node in nodes for name in node.input}
    inits = [t for t in inits if t.name in used]
    graph = helper.make_graph(
        nodes,
        f"test-{kind}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", card.window, len(metrics)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests.onnx_models")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    if embed_card:
        helper.set_model_props(model, {CARD_METADATA_KEY: card.model_dump_json(exclude={"sha256"})})
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def make_card(profile: str = "sim-boiler", inputs: list[tuple[str, str]] | None = None, *, window: int = 60,
              threshold: float = 3.0, clear_threshold: float | None = None, sample_period_s: float = 1.0,
              opset: int = 17, name: str = "test-model", version: int = 1) -> ModelCard:
    """A valid card for a test model (``inputs`` as ``(metric, unit)``; default: the sim profile's model inputs)."""
    if inputs is None:
        from models.simdata import MODEL_INPUTS, Kind, metric_units

        kind: Kind = "boiler" if profile == "sim-boiler" else "meter"
        units = metric_units(kind)
        inputs = [(m, units[m]) for m in MODEL_INPUTS[kind]]
    return ModelCard.model_validate({
        "name": name, "version": version, "profile": profile,
        "inputs": [{"metric": m, "unit": u} for m, u in inputs],
        "window": window, "sample_period_s": sample_period_s, "threshold": threshold,
        "clear_threshold": clear_threshold, "method": "test statistic", "training_data": "none",
        "created": "2024-01-01T00:00:00Z", "opset": opset,
    })

"""Small ONNX anomaly models built with ``onnx.helper`` for the edge-inference tests.

The good one scores a window by its mean absolute deviation from a centre, summed over the
features: ``score = sum_f mean_t |x[t, f] - c[f]|``. The broken ones are broken on purpose: wrong
rank or shape, no card, non-finite scores, an opset or IR version onnxruntime does not know.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from protocol.anomaly import CARD_METADATA_KEY, ModelCard, ModelInput

OPSET = 18  # ReduceMean/ReduceSum take their axes as an input from 18 on


def card(**changes: Any) -> ModelCard:
    """A card for a 2-input boiler model over 4 samples of 1 s; ``changes`` override fields."""
    base: dict[str, Any] = {
        "name": "test-boiler", "version": 1, "profile": "sim-boiler",
        "inputs": [ModelInput(metric="flow_temp", unit="degC"), ModelInput(metric="pressure", unit="bar")],
        "window": 4, "sample_period_s": 1.0, "threshold": 1.0, "clear_threshold": 0.5,
        "method": "mean absolute deviation from a centre, summed over inputs (test model)",
        "training_data": "none", "created": "2026-12-03T00:00:00Z", "opset": OPSET,
    }
    base.update(changes)
    return ModelCard(**base)


def _card_json(c: ModelCard) -> str:
    return json.dumps(c.model_dump(mode="json", exclude_none=True, exclude={"sha256"}))


def _finish(graph: onnx.GraphProto, c: ModelCard | None, opset: int = OPSET, ir_version: int | None = None,
            metadata: dict[str, str] | None = None) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = ir_version or 8
    props = dict(metadata or {})
    if c is not None:
        props[CARD_METADATA_KEY] = _card_json(c)
    helper.set_model_props(model, props)
    return model.SerializeToString()


def _io(features: int, window: int | str, rank: int, batch: int | str, input_name: str,
        output_name: str) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    shape: list[int | str] = [batch, window, features] if rank == 3 else [batch, features]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch])
    return x, y


def mad_model(c: ModelCard | None, centre: Sequence[float], *, window: int | str = "W", batch: int | str = "N",
              features: int | None = None, rank: int = 3, input_name: str = "window", output_name: str = "score",
              opset: int = OPSET, ir_version: int | None = None) -> bytes:
    """``score = sum_f mean_t |x - centre|`` with the card ``c`` embedded (None: no card)."""
    f = len(centre) if features is None else features
    x, y = _io(f, window, rank, batch, input_name, output_name)
    time_axis = 1 if rank == 3 else 0
    inits = [numpy_helper.from_array(np.asarray(centre, np.float32), "centre"),
             numpy_helper.from_array(np.array([time_axis], np.int64), "time_axis"),
             numpy_helper.from_array(np.array([-1], np.int64), "feature_axis")]
    nodes = [helper.make_node("Sub", [input_name, "centre"], ["dev"]),
             helper.make_node("Abs", ["dev"], ["abs"]),
             helper.make_node("ReduceMean", ["abs", "time_axis"], ["mean"], keepdims=0),
             helper.make_node("ReduceSum", ["mean", "feature_axis"], [output_name], keepdims=0)]
    graph = helper.make_graph(nodes, "mad", [x], [y], inits)
    return _finish(graph, c, opset, ir_version)


def log_model(c: ModelCard, offset: Sequence[float] | None = None) -> bytes:
    """``score = sum_f mean_t log(x - offset)``: finite while every input is above ``offset``, NaN
    (log of a negative number) or -inf (log 0) otherwise."""
    f = len(c.inputs)
    x, y = _io(f, "W", 3, "N", "window", "score")
    inits = [numpy_helper.from_array(np.asarray(offset or [0.0] * f, np.float32), "offset"),
             numpy_helper.from_array(np.array([1], np.int64), "time_axis"),
             numpy_helper.from_array(np.array([-1], np.int64), "feature_axis")]
    nodes = [helper.make_node("Sub", ["window", "offset"], ["shifted"]),
             helper.make_node("Log", ["shifted"], ["log"]),
             helper.make_node("ReduceMean", ["log", "time_axis"], ["mean"], keepdims=0),
             helper.make_node("ReduceSum", ["mean", "feature_axis"], ["score"], keepdims=0)]
    return _finish(helper.make_graph(nodes, "log", [x], [y], inits), c)


def div_zero_model(c: ModelCard) -> bytes:
    """``score = sum_f mean_t x / 0``: infinite (or NaN for 0/0) whatever the input."""
    f = len(c.inputs)
    x, y = _io(f, "W", 3, "N", "window", "score")
    inits = [numpy_helper.from_array(np.zeros(f, np.float32), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "time_axis"),
             numpy_helper.from_array(np.array([-1], np.int64), "feature_axis")]
    nodes = [helper.make_node("Div", ["window", "zero"], ["q"]),
             helper.make_node("ReduceMean", ["q", "time_axis"], ["mean"], keepdims=0),
             helper.make_node("ReduceSum", ["mean", "feature_axis"], ["score"], keepdims=0)]
    return _finish(helper.make_graph(nodes, "div0", [x], [y], inits), c)


def two_output_model(c: ModelCard) -> bytes:
    """A model whose output is called ``anomaly`` instead of ``score``."""
    return mad_model(c, [0.0] * len(c.inputs), output_name="anomaly")


def mad_score(window: npt.ArrayLike, centre: Sequence[float]) -> float:
    """What :func:`mad_model` returns for one window ``[W, F]``, computed in float32 like onnxruntime."""
    w = np.asarray(window, np.float32)
    return float(np.abs(w - np.asarray(centre, np.float32)).mean(axis=0, dtype=np.float32).sum(dtype=np.float32))

"""Loading, checking and running anomaly models (ONNX, contract in ``protocol/anomaly.py``).

A model file is checked completely before it scores anything: size, optional SHA-256, that
onnxruntime can parse it (and supports its opset and IR version), the embedded card, the
``window``/``score`` signature against the card, and one trial run. Every refusal is a
:class:`ModelLoadError` (a :class:`protocol.anomaly.ModelFileError`) whose message names the file
and what is wrong, and whose ``kind`` is a short label for metrics and events.

Scoring never runs on the event loop: one :class:`ScoringEngine` owns a single worker thread that
every model of the agent scores on, one batched call per model and scoring round. Each model has
one ``InferenceSession``, created once, with ``intra_op_num_threads`` from the configuration
(default 1), one inter-op thread and sequential execution.

onnxruntime is imported on first use only: an agent without models does not pay its memory.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from protocol.anomaly import (
    INPUT_NAME,
    MAX_MODEL_BYTES,
    OUTPUT_NAME,
    ModelCard,
    ModelFileError,
    card_from_metadata,
    import_onnxruntime,
    sha256_of,
)

if TYPE_CHECKING:  # numpy, like onnxruntime, is imported once a model is loaded
    import numpy as np
    import numpy.typing as npt

    Windows = npt.NDArray[np.float32]
    """A batch of windows, float32 ``[batch, window, features]``."""
    Scores = npt.NDArray[np.float32]
    """Scores, float32 ``[batch]``."""

THREAD_NAME = "edge-inference"
T = TypeVar("T")


class ModelLoadError(ModelFileError):
    """A model that cannot be used. ``kind`` is one of ``missing``, ``unreadable``, ``too-big``,
    ``sha256``, ``corrupt``, ``opset``, ``card``, ``shape``, ``run``, ``self-test``, ``download``."""

    def __init__(self, source: str, kind: str, reason: str) -> None:
        self.source = source
        self.kind = kind
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class ScoringError(RuntimeError):
    """A model failed while scoring live windows (raised, wrong output shape)."""


def _ort() -> Any:
    # Deliberately lazy: about 20 MB of RSS (and numpy another 11); telemetry off (see there).
    return import_onnxruntime()


def onnxruntime_version() -> str:
    """Version of the onnxruntime this agent runs."""
    return str(_ort().__version__)


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_OPSET = re.compile(r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S)
_IR = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def _explain_ort_error(source: str, exc: Exception) -> ModelLoadError:
    """Turn onnxruntime's load error into a short, specific reason."""
    text = str(exc)
    version = onnxruntime_version()
    if m := _OPSET.search(text):
        return ModelLoadError(source, "opset", f"uses opset {m.group(1)} of domain {m.group(2)}, but onnxruntime "
                                               f"{version} supports up to opset {m.group(3)}")
    if m := _IR.search(text):
        return ModelLoadError(source, "opset", f"has ONNX IR version {m.group(1)}, but onnxruntime {version} "
                                               f"supports up to {m.group(2)}")
    text = _ORT_PREFIX.sub("", text).strip()
    if "opset" in text.lower():
        return ModelLoadError(source, "opset", f"opset not supported by onnxruntime {version}: {text[-300:]}")
    if "protobuf parsing failed" in text or "No graph was found" in text:
        return ModelLoadError(source, "corrupt", f"not a readable ONNX model (corrupt or truncated file): {text}")
    return ModelLoadError(source, "corrupt", f"onnxruntime {version} cannot load it: {text[-400:]}")


def read_model_file(path: Path) -> bytes:
    """The bytes of a model file; :class:`ModelLoadError` if missing, unreadable or too big."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise ModelLoadError(source, "too-big", f"{size} bytes, more than the {MAX_MODEL_BYTES} a model may have")
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(source, "missing", "model file not found") from None
    except IsADirectoryError:
        raise ModelLoadError(source, "unreadable", "is a directory, not a model file") from None
    except OSError as exc:
        raise ModelLoadError(source, "unreadable", f"cannot read: {exc.strerror or exc}") from None


class AnomalyModel:
    """One loaded, checked model: its card, its hash and its onnxruntime session."""

    def __init__(self, engine: ScoringEngine, session: Any, card: ModelCard, sha256: str, source: str,
                 size: int, per_window: bool) -> None:
        self.engine = engine
        self.card = card
        self.sha256 = sha256
        self.source = source
        self.size = size
        self._session = session
        self._per_window = per_window  # the graph's batch dimension is fixed at 1
        self.failed: str | None = None
        """Why the model failed live (raised, non-finite score); a failed model scores nothing more."""
        self.last_thread: int | None = None
        """Ident of the thread the last :meth:`score_sync` ran on (observability and tests)."""

    def __repr__(self) -> str:
        return f"AnomalyModel({self.card.name} v{self.card.version}, {self.sha256[:12]}, {self.source})"

    @property
    def label(self) -> str:
        """``name v<version>``, for logs and messages."""
        return f"{self.card.name} v{self.card.version}"

    @property
    def layout(self) -> tuple[tuple[str, ...], int]:
        """(input metrics, window length): models with equal layouts can share a device's window."""
        return self.card.input_metrics, self.card.window

    def score_sync(self, windows: Windows) -> Scores:
        """Score ``windows`` ``[batch, window, features]`` in the calling thread; :class:`ScoringError`
        if the model raises or returns something else than ``[batch]`` scores. Non-finite scores are
        returned as they are (the caller decides)."""
        import numpy as np

        self.last_thread = threading.get_ident()
        x = np.ascontiguousarray(windows, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.card.window, len(self.card.inputs)):
            raise ScoringError(f"{self.label}: windows of shape {x.shape}, expected "
                               f"[batch, {self.card.window}, {len(self.card.inputs)}]")
        try:
            if self._per_window:
                parts = [self._session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 1]})[0] for i in range(len(x))]
                out = np.concatenate([np.asarray(p).reshape(-1) for p in parts]) if parts else np.empty(0)
            else:
                out = np.asarray(self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ScoringError(f"{self.label}: scoring failed: {exc}") from exc
        if out.shape != (len(x),):
            raise ScoringError(f"{self.label}: output {OUTPUT_NAME!r} has shape {out.shape}, expected ({len(x)},)")
        return out.astype(np.float32, copy=False)

    async def score(self, windows: Windows) -> Scores:
        """Score a batch of windows on the engine's worker thread (never on the event loop)."""
        return await self.engine.run(self.score_sync, windows)

    async def self_test(self, windows: Windows) -> Scores:
        """Score ``windows`` and insist on finite scores; :class:`ModelLoadError` (kind ``self-test``) if not."""
        import numpy as np

        try:
            scores = await self.score(windows)
        except ScoringError as exc:
            raise ModelLoadError(self.source, "self-test", f"self-test failed: {exc}") from None
        if not np.all(np.isfinite(scores)):
            bad = next(float(s) for s in scores if not np.isfinite(s))
            raise ModelLoadError(self.source, "self-test",
                                 f"self-test score is not finite ({bad}) on a window of "
                                 f"{len(self.card.inputs)} inputs x {self.card.window} samples")
        return scores


class ScoringEngine:
    """The single worker thread that every model scores on, and the factory of checked models."""

    def __init__(self, intra_op_threads: int = 1) -> None:
        self.intra_op_threads = intra_op_threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Stop the worker thread (scoring calls still queued are dropped)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _session(self, data: bytes, source: str) -> Any:
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors reach us as exceptions; onnxruntime's warnings are noise here
        try:
            return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise _explain_ort_error(source, exc) from None

    def load_bytes(self, data: bytes, source: str, *, expected_sha256: str | None = None,
                   profile: str | None = None) -> AnomalyModel:
        """Check ``data`` as a model for ``profile`` and load it (blocking; see :meth:`load`).

        ``source`` names the file or URL in error messages.
        """
        if len(data) > MAX_MODEL_BYTES:
            raise ModelLoadError(source, "too-big", f"{len(data)} bytes, more than the {MAX_MODEL_BYTES} "
                                                    f"a model may have")
        if not data:
            raise ModelLoadError(source, "corrupt", "empty file")
        digest = sha256_of(data)
        if expected_sha256 is not None and digest != expected_sha256:
            raise ModelLoadError(source, "sha256", f"SHA-256 is {digest}, expected {expected_sha256}")
        session = self._session(data, source)
        try:
            card = card_from_metadata(dict(session.get_modelmeta().custom_metadata_map), source)
        except ModelFileError as exc:
            raise ModelLoadError(source, "card", str(exc).removeprefix(f"{source}: ")) from None
        if profile is not None and card.profile != profile:
            raise ModelLoadError(source, "card", f"its card is for profile {card.profile!r}, not {profile!r}")
        per_window = self._check_signature(session, card, source)
        import numpy as np

        model = AnomalyModel(self, session, card, digest, source, len(data), per_window)
        # One trial run: a graph that loads but cannot run on [1, W, F] is refused here, not live.
        try:
            model.score_sync(np.zeros((1, card.window, len(card.inputs)), np.float32))
        except ScoringError as exc:
            raise ModelLoadError(source, "run", f"trial run on a [1, {card.window}, {len(card.inputs)}] window "
                                                f"failed: {exc}") from None
        return model

    @staticmethod
    def _check_signature(session: Any, card: ModelCard, source: str) -> bool:
        """Check inputs and outputs against the card; True if the batch dimension is fixed at 1."""
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
        if len(inputs) != 1 or names[0] != INPUT_NAME:
            raise ModelLoadError(source, "shape", f"model inputs are {names}, expected exactly [{INPUT_NAME!r}]")
        inp = inputs[0]
        if inp.type != "tensor(float)":
            raise ModelLoadError(source, "shape", f"input {INPUT_NAME!r} is {inp.type}, expected tensor(float)")
        shape = list(inp.shape or [])
        want = f"[batch, {card.window}, {len(card.inputs)}]"
        if len(shape) != 3:
            raise ModelLoadError(source, "shape", f"input {INPUT_NAME!r} has rank {len(shape)} {shape}, "
                                                  f"expected rank 3 {want}")
        batch, window, features = shape
        if features != len(card.inputs):
            raise ModelLoadError(source, "shape", f"input {INPUT_NAME!r} has {features} features (last dimension), "
                                                  f"but the card lists {len(card.inputs)} inputs "
                                                  f"{list(card.input_metrics)}")
        if isinstance(window, int) and window != card.window:
            raise ModelLoadError(source, "shape", f"input {INPUT_NAME!r} has a window of {window} samples, "
                                                  f"but the card says {card.window}")
        if isinstance(batch, int) and batch != 1:
            raise ModelLoadError(source, "shape", f"input {INPUT_NAME!r} has a fixed batch dimension of {batch}; "
                                                  f"it must be symbolic (or 1)")
        outputs = {o.name: o for o in session.get_outputs()}
        out = outputs.get(OUTPUT_NAME)
        if out is None:
            raise ModelLoadError(source, "shape", f"model outputs are {sorted(outputs)}, no {OUTPUT_NAME!r}")
        if out.type != "tensor(float)":
            raise ModelLoadError(source, "shape", f"output {OUTPUT_NAME!r} is {out.type}, expected tensor(float)")
        if out.shape is not None and len(out.shape) != 1:
            raise ModelLoadError(source, "shape", f"output {OUTPUT_NAME!r} has rank {len(out.shape)} {out.shape}, "
                                                  f"expected rank 1 [batch]")
        return isinstance(batch, int) and batch == 1

    async def load(self, data: bytes, source: str, *, expected_sha256: str | None = None,
                   profile: str | None = None) -> AnomalyModel:
        """:meth:`load_bytes` on a helper thread (creating a session can take a while; scoring goes on)."""
        return await asyncio.to_thread(self.load_bytes, data, source, expected_sha256=expected_sha256,
                                       profile=profile)

    async def load_file(self, path: Path, *, expected_sha256: str | None = None,
                        profile: str | None = None) -> AnomalyModel:
        """Read and load a model file off the event loop."""
        data = await asyncio.to_thread(read_model_file, path)
        return await self.load(data, str(path), expected_sha256=expected_sha256, profile=profile)

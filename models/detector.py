"""Window anomaly detectors: fitted in numpy, exported as small ONNX graphs the edge runs.

A detector turns one window ``[W, F]`` of raw readings into features (per input: the window mean,
and optionally its standard deviation and least-squares slope), standardises them with statistics
of normal data, and scores them with one of two families:

(``rate``, the mean increment per sample, is for cumulative counters: for an energy register it
is exactly the mean power over the window, where a least-squares slope is not.)

``zrms``
    root-mean-square of the standardised features (a diagonal Mahalanobis distance). Each
    feature's scale is its normal spread, but never less than a *floor*: an absolute one (e.g.
    1 K for a motor body whose temperature wanders by that much from run to run) or one relative
    to the level (e.g. 5 % of a vibration RMS). Without floors a feature that happened to be
    quiet during training (a few hundred samples) alarms on any later wobble.
``pca``
    PCA of the standardised features. Score = the largest of five ratios, each a statistic over
    its 99th percentile on the training data: Hotelling's T² in the retained components; T² in
    the discarded (minor) components; the squared prediction error Q (what the retained
    components cannot explain); the largest single standardised residual; the largest single
    |z|; and, with ``logstd`` features, a *collapse* ratio that is large when an input's spread
    falls far below anything seen in training. Exact relations between inputs (an energy counter's
    rate and the power) live in the minor components, loose ones (pressure vs water temperature)
    in Q, and a frozen sensor (spread exactly 0) shows in the collapse ratio.

The score is "larger is worse"; the alarm threshold is calibrated separately on normal data.
:meth:`WindowDetector.to_onnx` builds the same computation with plain ONNX operators (opset 17),
so the edge needs only onnxruntime; :meth:`WindowDetector.score` is the numpy reference the tests
compare it with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from protocol.anomaly import CARD_METADATA_KEY, INPUT_NAME, OUTPUT_NAME, ModelCard

Feature = Literal["mean", "std", "logstd", "slope", "rate"]
Family = Literal["zrms", "pca"]
OPSET = 17
_EPS = 1e-9

Array = npt.NDArray[np.float64]


LOGSTD_EPS = 1e-3
"""``logstd`` = log(std + eps): a frozen sensor's std is exactly 0, far below any live one. eps may be
per input (its register resolution), so a reading that sits on one register value for a while (a
frequency pinned at its limit) is not mistaken for a frozen sensor."""


def window_features(windows: npt.ArrayLike, features: Sequence[Feature],
                    keep: npt.ArrayLike | None = None, logstd_eps: npt.ArrayLike = LOGSTD_EPS) -> Array:
    """Features of each window: ``[N, W, F]`` -> ``[N, len(features) * F]`` (grouped by feature),
    then only the columns ``keep`` if given (e.g. no ``mean`` of a cumulative counter)."""
    x = np.asarray(windows, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"windows must be [N, W, F], got shape {x.shape}")
    mean = x.mean(axis=1)
    out: list[Array] = []
    for feat in features:
        if feat == "mean":
            out.append(mean)
        elif feat in ("std", "logstd"):
            rel = x - x[:, :1, :]
            std = np.sqrt(((rel - rel.mean(axis=1, keepdims=True)) ** 2).mean(axis=1))
            out.append(std if feat == "std" else np.log(std + np.asarray(logstd_eps, dtype=np.float64)))
        elif feat == "slope":
            out.append(np.einsum("nwf,w->nf", x - x[:, :1, :], _slope_weights(x.shape[1])))
        elif feat == "rate":
            out.append((x[:, -1, :] - x[:, 0, :]) / max(1, x.shape[1] - 1))
        else:
            raise ValueError(f"unknown feature {feat!r}")
    feats = np.concatenate(out, axis=1)
    return feats if keep is None else feats[:, np.asarray(keep, dtype=np.int64)]


def _slope_weights(w: int) -> Array:
    # Least-squares slope per sample: sum_t c_t x_t with c_t = (t - mean t) / sum (t - mean t)^2.
    t = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    denom = float((t * t).sum())
    return t / denom if denom > 0 else np.zeros(w)


def sliding_windows(series: npt.ArrayLike, window: int) -> npt.NDArray[np.float64]:
    """All windows of ``window`` consecutive rows of ``[T, F]`` (a view: ``[T - window + 1, window, F]``)."""
    x = np.asarray(series, dtype=np.float64)
    if len(x) < window:
        return np.empty((0, window, x.shape[1]))
    v = np.lib.stride_tricks.sliding_window_view(x, window, axis=0)  # [N, F, W]
    return np.swapaxes(v, 1, 2)


def causal_window_means(series: npt.ArrayLike, window: int) -> Array:
    """Mean of the last ``window`` rows at every row (fewer at the start): the ``mean`` feature, O(T)."""
    x = np.asarray(series, dtype=np.float64)
    c = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    n = np.arange(1, len(x) + 1)
    lo = np.maximum(0, n - window)
    out: Array = (c[n] - c[lo]) / (n - lo)[:, None]
    return out


@dataclass
class WindowDetector:
    """A fitted detector; see the module docstring for the two families."""

    window: int
    features: tuple[Feature, ...]
    family: Family
    center: Array
    scale: Array
    components: Array = field(default_factory=lambda: np.zeros((0, 0)))
    """PCA only: ``[n_features, k]`` orthonormal columns."""
    t2_weights: Array = field(default_factory=lambda: np.zeros(0))
    """PCA only: ``1 / (eigenvalue * T² limit)`` per retained component."""
    q_limit: float = 1.0
    minor_components: Array = field(default_factory=lambda: np.zeros((0, 0)))
    """PCA only: the discarded components ``[n_features, m]``. Exact relations between inputs (an
    energy counter's rate and the power) live here with tiny variance: T² over them catches a fault
    that breaks one (tamper) long before Q, which is dominated by the loose relations."""
    minor_weights: Array = field(default_factory=lambda: np.zeros(0))
    """PCA only: ``1 / (eigenvalue * limit)`` per minor component."""
    resid_scale: Array = field(default_factory=lambda: np.zeros(0))
    """PCA only: per feature, ``1 / (training residual std * limit of the largest standardised residual)``.
    A fault that breaks one tight relation (energy counter vs power) leaves a residual too small to
    move Q, which sums over every loose relation, but huge next to that feature's own residual
    spread."""
    z_limit: float = 0.0
    collapse_floor: Array = field(default_factory=lambda: np.zeros(0))
    """PCA with ``logstd`` only, per input: ``s_lo + e`` where ``s_lo`` is the 0.1 % quantile of the
    input's window std in training and ``e`` a hundredth of its register resolution. The term
    ``max_j (s_lo_j + e_j) / (std_j + e_j)`` is about 1 at worst on normal data and in the tens or
    hundreds for a frozen sensor (std exactly 0), whatever the PCA makes of the rest."""
    collapse_eps: Array = field(default_factory=lambda: np.zeros(0))
    """PCA only: limit of the largest |z| of one feature (a univariate check; 0 = off)."""
    n_inputs: int = 0
    """Number of input metrics (F); 0 means len(center) / len(features) (every feature of every input)."""
    keep: tuple[int, ...] | None = None
    """Feature columns used (of ``len(features) * F``, grouped by feature); None = all."""
    logstd_eps: Array | float = LOGSTD_EPS
    """Per input (or one for all): see :data:`LOGSTD_EPS`."""

    def __post_init__(self) -> None:
        if not self.n_inputs:
            self.n_inputs = len(self.center) // len(self.features)

    def score_features(self, feats: Array) -> Array:
        """Score feature rows ``[N, n_features]``."""
        z = (feats - self.center) / self.scale
        if self.family == "zrms":
            out: Array = np.sqrt((z * z).mean(axis=1))
            return out
        proj = z @ self.components
        t2 = (proj * proj) @ self.t2_weights
        resid = z - proj @ self.components.T
        q = (resid * resid).sum(axis=1) / self.q_limit
        out = np.maximum(t2, q)
        if self.minor_components.size:
            minor = z @ self.minor_components
            out = np.maximum(out, (minor * minor) @ self.minor_weights)
        if len(self.resid_scale):
            out = np.maximum(out, np.abs(resid * self.resid_scale).max(axis=1))
        if self.z_limit:
            out = np.maximum(out, np.abs(z).max(axis=1) / self.z_limit)
        if len(self.collapse_floor):
            std = np.exp(feats[:, self.logstd_columns]) - self.logstd_eps
            out = np.maximum(out, (self.collapse_floor / (np.maximum(std, 0.0) + self.collapse_eps)).max(axis=1))
        return out

    @property
    def logstd_columns(self) -> list[int]:
        """Columns of the (kept) feature rows holding each input's log std, in input order."""
        if "logstd" not in self.features:
            return []
        base = self.features.index("logstd") * self.n_inputs
        cols = list(range(base, base + self.n_inputs))
        if self.keep is None:
            return cols
        pos = {c: i for i, c in enumerate(self.keep)}
        return [pos[c] for c in cols]

    def score(self, windows: npt.ArrayLike) -> Array:
        """Score windows ``[N, W, F]`` (the numpy reference of the ONNX graph)."""
        return self.score_features(self.features_of(windows))

    def features_of(self, windows: npt.ArrayLike) -> Array:
        """The feature rows this detector scores, for windows ``[N, W, F]``."""
        return window_features(windows, self.features, self.keep, self.logstd_eps)

    def to_onnx(self, card: ModelCard) -> bytes:
        """The detector as an ONNX model with ``card`` embedded in its metadata."""
        return _build_onnx(self, card)


def fit_zrms(
    train: Array,
    window: int,
    *,
    floor_abs: npt.ArrayLike | None = None,
    floor_rel: npt.ArrayLike | None = None,
) -> WindowDetector:
    """Fit a ``zrms`` detector on the window means of normal rows ``train`` ``[T, F]``.

    The centre and spread are those of the raw rows (not of overlapping window means, whose
    spread a few hundred rows cannot estimate), with the floors described in the module doc.
    """
    x = np.asarray(train, dtype=np.float64)
    f = x.shape[1]
    center = x.mean(axis=0)
    spread = x.std(axis=0)
    fa = np.zeros(f) if floor_abs is None else np.broadcast_to(np.asarray(floor_abs, dtype=np.float64), (f,))
    fr = np.zeros(f) if floor_rel is None else np.broadcast_to(np.asarray(floor_rel, dtype=np.float64), (f,))
    scale = np.maximum.reduce([spread, fa, fr * np.abs(center)]) + _EPS
    return WindowDetector(window=window, features=("mean",), family="zrms", center=center, scale=scale)


def fit_pca(
    train_windows: Array,
    window: int,
    features: Sequence[Feature] = ("mean", "std", "slope"),
    *,
    variance: float = 0.99,
    limit_quantile: float = 0.99,
    floor: npt.ArrayLike | None = None,
    keep: Sequence[int] | None = None,
    logstd_eps: npt.ArrayLike = LOGSTD_EPS,
) -> WindowDetector:
    """Fit a ``pca`` detector on windows of normal data ``[N, W, F]``.

    ``floor`` (per feature column, optional) is the smallest scale a feature may get, for
    features that are nearly constant in normal data (a stuck sensor's std is 0, but so is a
    perfectly quantised quiet one).
    """
    n_inputs = np.shape(train_windows)[2]
    eps = np.broadcast_to(np.asarray(logstd_eps, dtype=np.float64), (n_inputs,)).copy()
    return fit_pca_features(window_features(train_windows, features, keep, eps), window, features, n_inputs,
                            variance=variance, limit_quantile=limit_quantile, floor=floor, keep=keep, logstd_eps=eps)


def fit_pca_features(
    feats: Array,
    window: int,
    features: Sequence[Feature],
    n_inputs: int,
    *,
    variance: float = 0.99,
    limit_quantile: float = 0.99,
    floor: npt.ArrayLike | None = None,
    keep: Sequence[int] | None = None,
    logstd_eps: npt.ArrayLike = LOGSTD_EPS,
) -> WindowDetector:
    """:func:`fit_pca` on feature rows already computed (``window_features`` with the same
    ``features``, ``keep`` and ``logstd_eps``): lets training stream many units through without
    holding their windows."""
    eps = np.broadcast_to(np.asarray(logstd_eps, dtype=np.float64), (n_inputs,)).copy()
    center = feats.mean(axis=0)
    scale = feats.std(axis=0)
    if floor is not None:
        scale = np.maximum(scale, np.broadcast_to(np.asarray(floor, dtype=np.float64), scale.shape))
    scale = scale + 1e-6
    z = (feats - center) / scale
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    eig = s * s / max(1, len(z) - 1)
    ratio = np.cumsum(eig) / eig.sum()
    k = int(np.searchsorted(ratio, variance) + 1)
    k = max(1, min(k, len(eig) - 1))
    comps = vt[:k].T
    proj = z @ comps
    t2 = (proj * proj / eig[:k]).sum(axis=1)
    t2_limit = float(np.quantile(t2, limit_quantile)) or 1.0
    resid = z - proj @ comps.T
    q = (resid * resid).sum(axis=1)
    q_limit = float(np.quantile(q, limit_quantile)) or 1.0
    # Eigenvalues floored so that a direction with no variance at all does not divide by zero.
    minor = vt[k:].T
    lam_minor = np.maximum(eig[k:], 1e-6 * float(eig.sum()))
    t2_minor = ((z @ minor) ** 2 / lam_minor).sum(axis=1)
    minor_limit = float(np.quantile(t2_minor, limit_quantile)) or 1.0
    r_std = resid.std(axis=0) + 1e-6
    r_limit = float(np.quantile(np.abs(resid / r_std).max(axis=1), limit_quantile)) or 1.0
    z_limit = float(np.quantile(np.abs(z).max(axis=1), limit_quantile)) or 1.0
    collapse: dict[str, Array] = {}
    if "logstd" in features:
        probe = WindowDetector(window=window, features=tuple(features), family="pca", center=center, scale=scale,
                               n_inputs=n_inputs, keep=None if keep is None else tuple(int(i) for i in keep),
                               logstd_eps=eps)
        std = np.maximum(np.exp(feats[:, probe.logstd_columns]) - eps, 0.0)
        c_eps = eps / 10.0  # logstd's eps is a tenth of the resolution: this is a hundredth
        collapse = {"collapse_floor": np.quantile(std, 0.001, axis=0) + c_eps, "collapse_eps": c_eps}
    return WindowDetector(
        window=window, features=tuple(features), family="pca", center=center, scale=scale,
        components=comps, t2_weights=1.0 / (eig[:k] * t2_limit), q_limit=q_limit,
        minor_components=minor, minor_weights=1.0 / (lam_minor * minor_limit),
        resid_scale=1.0 / (r_std * r_limit), z_limit=z_limit, **collapse,
        n_inputs=n_inputs, keep=None if keep is None else tuple(int(i) for i in keep), logstd_eps=eps,
    )


# --- ONNX export ---------------------------------------------------------------------------------


def _build_onnx(det: WindowDetector, card: ModelCard) -> bytes:
    import onnx  # training-time dependency only
    from onnx import TensorProto, helper, numpy_helper

    if card.window != det.window or len(card.inputs) != det.n_inputs:
        raise ValueError(f"card (window {card.window}, {len(card.inputs)} inputs) does not match the detector "
                         f"(window {det.window}, {det.n_inputs} inputs)")
    f32 = np.float32
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: npt.ArrayLike, dtype: type = f32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    # ReduceMean takes its axes as an attribute up to opset 17; Squeeze/ReduceSum as an input.
    axis1 = const("axis1", [1], np.int64) if det.family == "pca" else ""
    nodes.append(helper.make_node("ReduceMean", [INPUT_NAME], ["mean"], axes=[1], keepdims=0))
    parts: list[str] = []
    made: set[str] = set()

    def rel_x(nodes: list[onnx.NodeProto], const: Callable[..., str]) -> None:
        if "rel" in made:
            return
        nodes.append(helper.make_node("Slice", [INPUT_NAME, const("s0", [0], np.int64), const("s1", [1], np.int64),
                                                const("s_axis", [1], np.int64)], ["first"]))
        nodes.append(helper.make_node("Sub", [INPUT_NAME, "first"], ["rel"]))
        made.add("rel")

    for feat in det.features:
        if feat == "mean":
            parts.append("mean")
        elif feat in ("std", "logstd"):
            if "std" not in made:
                # Spread of x - x[first], whose values are small and exact in float32 (a counter near
                # 10,000 kWh has no digits left for its spread otherwise).
                rel_x(nodes, const)
                nodes.append(helper.make_node("ReduceMean", ["rel"], ["mean_k"], axes=[1], keepdims=1))
                nodes.append(helper.make_node("Sub", ["rel", "mean_k"], ["dev"]))
                nodes.append(helper.make_node("Mul", ["dev", "dev"], ["dev2"]))
                nodes.append(helper.make_node("ReduceMean", ["dev2"], ["var"], axes=[1], keepdims=0))
                nodes.append(helper.make_node("Sqrt", ["var"], ["std"]))
                made.add("std")
            if feat == "logstd":
                eps = np.broadcast_to(np.asarray(det.logstd_eps, dtype=np.float64), (det.n_inputs,))
                nodes.append(helper.make_node("Add", ["std", const("logstd_eps", eps)], ["std_eps"]))
                nodes.append(helper.make_node("Log", ["std_eps"], ["logstd"]))
            parts.append(feat)
        elif feat == "slope":
            # Slope of x - x[first]: differences of nearby float32 values are exact, so a large
            # counter (energy in kWh) keeps its increments. [N, W, F] -> [N, F, W] @ [W, 1] -> [N, F].
            rel_x(nodes, const)
            nodes.append(helper.make_node("Transpose", ["rel"], ["xt"], perm=[0, 2, 1]))
            wts = const("slope_w", _slope_weights(det.window).reshape(-1, 1))
            nodes.append(helper.make_node("MatMul", ["xt", wts], ["slope3"]))
            ax2 = const("axis2", [2], np.int64)
            nodes.append(helper.make_node("Squeeze", ["slope3", ax2], ["slope"]))
            parts.append("slope")
        elif feat == "rate":
            # Mean increment per sample: for a counter, exactly the mean rate over the window.
            w = det.window
            nodes.append(helper.make_node("Slice", [INPUT_NAME, const("r0", [0], np.int64), const("r1", [1], np.int64),
                                                    const("r_axis", [1], np.int64)], ["r_first"]))
            nodes.append(helper.make_node("Slice", [INPUT_NAME, const("rl0", [w - 1], np.int64),
                                                    const("rl1", [w], np.int64), const("rl_axis", [1], np.int64)],
                                          ["r_last"]))
            nodes.append(helper.make_node("Sub", ["r_last", "r_first"], ["r_diff3"]))
            nodes.append(helper.make_node("Squeeze", ["r_diff3", const("r_sq", [1], np.int64)], ["r_diff"]))
            nodes.append(helper.make_node("Div", ["r_diff", const("r_den", float(max(1, w - 1)))], ["rate"]))
            parts.append("rate")
    if len(parts) > 1:
        nodes.append(helper.make_node("Concat", parts, ["feats"], axis=1))
        feats = "feats"
    else:
        feats = parts[0]
    if det.keep is not None:
        nodes.append(helper.make_node("Gather", [feats, const("keep", list(det.keep), np.int64)], ["kept"], axis=1))
        feats = "kept"
    nodes.append(helper.make_node("Sub", [feats, const("center", det.center)], ["centred"]))
    nodes.append(helper.make_node("Div", ["centred", const("scale", det.scale)], ["z"]))
    if det.family == "zrms":
        nodes.append(helper.make_node("Mul", ["z", "z"], ["z2"]))
        nodes.append(helper.make_node("ReduceMean", ["z2"], ["ms"], axes=[1], keepdims=0))
        nodes.append(helper.make_node("Sqrt", ["ms"], [OUTPUT_NAME]))
    else:
        nodes.append(helper.make_node("MatMul", ["z", const("components", det.components)], ["proj"]))
        nodes.append(helper.make_node("Mul", ["proj", "proj"], ["proj2"]))
        t2w = const("t2w", det.t2_weights.reshape(-1, 1))
        nodes.append(helper.make_node("MatMul", ["proj2", t2w], ["t2_2d"]))
        nodes.append(helper.make_node("Squeeze", ["t2_2d", axis1], ["t2"]))
        nodes.append(helper.make_node("MatMul", ["proj", const("components_t", det.components.T)], ["recon"]))
        nodes.append(helper.make_node("Sub", ["z", "recon"], ["resid"]))
        nodes.append(helper.make_node("Mul", ["resid", "resid"], ["resid2"]))
        nodes.append(helper.make_node("ReduceSum", ["resid2", axis1], ["qsum"], keepdims=0))
        nodes.append(helper.make_node("Div", ["qsum", const("q_limit", det.q_limit)], ["q"]))
        terms = ["t2", "q"]
        if det.minor_components.size:
            nodes.append(helper.make_node("MatMul", ["z", const("minor", det.minor_components)], ["mproj"]))
            nodes.append(helper.make_node("Mul", ["mproj", "mproj"], ["mproj2"]))
            mw = const("minor_w", det.minor_weights.reshape(-1, 1))
            nodes.append(helper.make_node("MatMul", ["mproj2", mw], ["t2m_2d"]))
            nodes.append(helper.make_node("Squeeze", ["t2m_2d", axis1], ["t2_minor"]))
            terms.append("t2_minor")
        if len(det.resid_scale):
            nodes.append(helper.make_node("Mul", ["resid", const("resid_scale", det.resid_scale)], ["rs"]))
            nodes.append(helper.make_node("Abs", ["rs"], ["rabs"]))
            nodes.append(helper.make_node("ReduceMax", ["rabs"], ["rmax"], axes=[1], keepdims=0))
            terms.append("rmax")
        if det.z_limit:
            nodes.append(helper.make_node("Abs", ["z"], ["zabs"]))
            nodes.append(helper.make_node("ReduceMax", ["zabs"], ["zmax_raw"], axes=[1], keepdims=0))
            nodes.append(helper.make_node("Div", ["zmax_raw", const("z_limit", det.z_limit)], ["zmax"]))
            terms.append("zmax")
        if len(det.collapse_floor):
            nodes.append(helper.make_node("Add", ["std", const("collapse_eps", det.collapse_eps)], ["std_c"]))
            floor = const("collapse_floor", det.collapse_floor)
            nodes.append(helper.make_node("Div", [floor, "std_c"], ["collapse_r"]))
            nodes.append(helper.make_node("ReduceMax", ["collapse_r"], ["collapse"], axes=[1], keepdims=0))
            terms.append("collapse")
        nodes.append(helper.make_node("Max", terms, [OUTPUT_NAME]))

    graph = helper.make_graph(
        nodes, f"{card.name}-v{card.version}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", card.window, len(card.inputs)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="digital-twin models", producer_version=str(card.version))
    model.ir_version = 8  # readable by onnxruntime >= 1.14 (Pi wheels lag behind)
    card_doc = card.model_copy(update={"sha256": None}).model_dump_json(exclude_none=True)
    helper.set_model_props(model, {CARD_METADATA_KEY: card_doc})
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data

"""Training and evaluation of the anomaly models the edge runs."""

import os

# onnxruntime >= 1.29 phones home by default; training and evaluation runs have no reason to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

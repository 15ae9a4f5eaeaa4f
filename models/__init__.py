"""Training and evaluation of the anomaly models the edge runs."""

"""The twin picture: per-component health of a device and its drawing (docs/twin.md)."""

"""Field drivers: everything protocol-specific (Modbus function codes, framing, request
planning) lives here. A driver turns a device's answers into point values; the rest of the
agent only sees :class:`edge.drivers.base.PointResult`."""

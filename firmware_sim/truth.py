"""What a simulated device last showed its clients, as a ground-truth log line."""

from __future__ import annotations

from typing import Any

from firmware_sim.inject import FaultInjector


class TruthSource:
    """Mixin for a device that publishes snapshots (Modbus device or IEC meter)."""

    name: str
    kind: str
    visible: dict[str, Any]
    visible_since_ms: int
    injector: FaultInjector

    def truth_record(self) -> dict[str, Any]:
        """The ground-truth log line for the current snapshot (with injected-fault counts, if any)."""
        record: dict[str, Any] = {"t": self.visible_since_ms, "device": self.name, "kind": self.kind,
                                  "values": self.visible}
        if injected := self.injector.injected():
            record["injected"] = injected
        return record

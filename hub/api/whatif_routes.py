"""``POST /api/v1/whatif``: the what-if simulator for technicians (:mod:`hub.whatif`, ``docs/whatif.md``)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hub import whatif
from hub.api.access import FIELD, Principal, allow
from hub.api.routes import Ctx
from hub.whatif import MAX_HORIZON_H, Scenario, WhatIfRefused
from protocol.ids import NAME_PATTERN

router = APIRouter(prefix="/api/v1", tags=["whatif"])

MAX_CONCURRENT_RUNS = 2
"""Runs at once per hub process (each takes one core for up to ~2 s); more get 429."""
SLOTS = whatif.RunSlots(MAX_CONCURRENT_RUNS)
_SETPOINT_MIN, _SETPOINT_MAX = whatif.profile().safe_range("flow_setpoint")


class ModelChoice(BaseModel):
    """A stored model version to score with instead of the profile's fleet-wide assignment."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]


class WhatIfIn(BaseModel):
    """Inputs of a what-if run; units in the field names."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["sim-boiler"] = Field("sim-boiler", description="Boiler model (the simulator's profile)")
    device: Annotated[str, Field(max_length=200)] | None = Field(
        None, description="A boiler of the fleet (`site.gateway.device`, profile sim-boiler): its latest "
                          "flow_setpoint and outdoor_temp are the defaults of flow_setpoint_c and outdoor_temp_c, "
                          "and the model is the one its gateway is assigned")
    model: ModelChoice | None = Field(None, description="Anomaly model version to use; default: the version "
                                                        "assigned to the device's gateway (with `device`), else "
                                                        "the version assigned fleet-wide to the profile")
    use_model: bool = Field(True, description="false: physics and rules only")
    horizon_h: Annotated[float, Field(gt=0, le=MAX_HORIZON_H)] = 24.0
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 1
    start_hour: Annotated[float, Field(ge=0, lt=24)] = 0.0
    flow_setpoint_c: float = Field(70.0, description=f"Flow setpoint, {_SETPOINT_MIN:g}..{_SETPOINT_MAX:g} degC "
                                                     "(the profile's safe range)")
    outdoor_temp_c: Annotated[float, Field(ge=-30, le=30)] = Field(5.0, description="Daily mean outdoor temperature")
    outdoor_swing_c: Annotated[float, Field(ge=0, le=15)] = Field(5.0, description="Amplitude of the daily swing")
    heat_demand_kw: Annotated[float, Field(ge=0, le=40)] | None = Field(
        None, description="Constant building heat demand; null: the weather-compensated daily schedule")
    scale: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="Scale fouling of the heat exchanger")
    scale_ramp_h: Annotated[float, Field(ge=0, le=MAX_HORIZON_H)] = Field(
        0.0, description="Hours for the scale to grow from 0 to `scale` after the onset (0: at once)")
    leak_bar_per_h: Annotated[float, Field(ge=0, le=100)] = Field(0.0, description="Water leak, bar lost per hour")
    fault_onset_h: Annotated[float, Field(ge=0, le=MAX_HORIZON_H)] = Field(
        0.0, description="When scale and leak start, hours after the start")

    @model_validator(mode="after")
    def _check(self) -> WhatIfIn:
        sp = self.flow_setpoint_c
        if not (math.isfinite(sp) and _SETPOINT_MIN <= sp <= _SETPOINT_MAX):
            raise ValueError(f"flow_setpoint_c must be within the profile's safe range "
                             f"{_SETPOINT_MIN:g}..{_SETPOINT_MAX:g} degC")
        if self.fault_onset_h > self.horizon_h:
            raise ValueError("fault_onset_h must not be after the horizon")
        return self

    def scenario(self) -> Scenario:
        """The simulator's inputs."""
        return Scenario(horizon_h=self.horizon_h, seed=self.seed, start_hour=self.start_hour,
                        flow_setpoint_c=self.flow_setpoint_c, outdoor_temp_c=self.outdoor_temp_c,
                        outdoor_swing_c=self.outdoor_swing_c, heat_demand_kw=self.heat_demand_kw, scale=self.scale,
                        scale_ramp_h=self.scale_ramp_h, leak_bar_per_h=self.leak_bar_per_h,
                        fault_onset_h=self.fault_onset_h)


def with_device_defaults(body: WhatIfIn, boiler: whatif.FleetBoiler) -> tuple[WhatIfIn, dict[str, float],
                                                                             dict[str, str]]:
    """``body`` with the boiler's latest readings for the fields the request left out (explicit
    fields win), the values taken and why the other defaults were not; :class:`WhatIfRefused` 422
    when a taken value is outside what the simulator accepts."""
    absent = [f for f in whatif.DEVICE_DEFAULTS if f not in body.model_fields_set]
    taken = {f: boiler.defaults[f] for f in absent if f in boiler.defaults}
    missing = {f: boiler.missing[f] for f in absent if f in boiler.missing}
    if not taken:
        return body, taken, missing
    try:
        merged = WhatIfIn.model_validate({**body.model_dump(exclude_unset=True), **taken})
    except ValidationError as exc:
        shown = ", ".join(f"{f} {v:g}" for f, v in taken.items())
        reasons = "; ".join(".".join(map(str, e["loc"])) + ": " * bool(e["loc"])
                            + str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise WhatIfRefused(422, f"the latest readings of {boiler.device.uid} give {shown}: {reasons}; "
                                 "give the field in the request instead") from None
    return merged, taken, missing


@router.post("/whatif", responses={
    404: {"description": "The chosen model version or device does not exist"},
    422: {"description": "Invalid inputs, or the device is not a sim-boiler boiler"},
    429: {"description": "Too many what-if runs at once; retry in a few seconds"},
})
async def run_whatif(ctx: Ctx, body: WhatIfIn, user: Annotated[Principal, allow(*FIELD)]) -> dict[str, Any]:
    """Simulate a boiler with the given inputs and faults; predicted trajectories, anomaly score and
    the alarms that would fire (``docs/whatif.md``). With ``device``, a boiler of the fleet: its
    latest readings fill the inputs left out, and its gateway's model scores."""
    if not SLOTS.try_acquire():
        raise HTTPException(429, f"{MAX_CONCURRENT_RUNS} what-if runs are already running; retry shortly",
                            headers={"Retry-After": "2"})
    try:
        boiler = await whatif.fleet_boiler(ctx.db, body.device) if body.device is not None else None
        from_device: dict[str, float] = {}
        not_from_device: dict[str, str] = {}
        if boiler is not None:
            body, from_device, not_from_device = with_device_defaults(body, boiler)
        return await whatif.run(ctx.db, body.scenario(), ctx.alerts.active_rules(),
                                model_name=body.model.name if body.model else None,
                                model_version=body.model.version if body.model else None, use_model=body.use_model,
                                boiler=boiler, from_device=from_device, not_from_device=not_from_device)
    except WhatIfRefused as exc:
        raise HTTPException(exc.status, exc.message) from None
    finally:
        SLOTS.release()

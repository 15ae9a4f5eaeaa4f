"""``twin-sim``: run simulated boilers and meters as Modbus TCP servers.

Prints one JSON line ``{"event": "ready", "devices": [...]}`` on stdout once every device listens;
logs go to stderr. Exit codes: 0 after SIGINT/SIGTERM, 2 for bad options or a port that cannot be
bound, 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from firmware_sim.model import FaultError
from firmware_sim.server import SimConfig, Simulators, SimulatorStartError
from protocol.logs import configure_logging, get_logger

log = get_logger("firmware_sim.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def parse_fault(text: str) -> tuple[str, str, str]:
    """Split ``DEVICE:KEY=VALUE`` (argparse ``type=``)."""
    device, colon, setting = text.partition(":")
    key, equals, value = setting.partition("=")
    if not (colon and equals and device.strip() and key.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not DEVICE:KEY=VALUE (e.g. boiler-1:leak=0.2, meter-1:tamper=1)")
    return device.strip(), key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The ``twin-sim`` argument parser."""
    p = argparse.ArgumentParser(
        prog="twin-sim",
        description="Simulated gas boilers and three-phase meters served over Modbus TCP "
                    "(unit id 1). Device i (boilers first, from 0) listens on base-port + i.",
    )
    p.add_argument("--boilers", type=int, default=2, metavar="N", help="number of boilers (default 2)")
    p.add_argument("--meters", type=int, default=2, metavar="M", help="number of meters (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--base-port", type=int, default=5020, metavar="P",
                   help="port of the first device (default 5020; 0 = a free port per device)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--tick", type=float, default=1.0, metavar="SECONDS",
                   help="simulated seconds per step (default 1.0)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="simulated seconds per wall-clock second (default 1.0; 0 freezes the clock)")
    p.add_argument("--start-hour", type=float, default=0.0, metavar="H",
                   help="simulated time of day at start, 0..24 (default 0 = midnight)")
    p.add_argument("--truth-log", type=Path, metavar="PATH",
                   help="append one JSON line per device per tick with the served values")
    p.add_argument("--meter-start-kwh", type=float, default=0.0, metavar="X",
                   help="initial energy counter of every meter, kWh (default 0)")
    p.add_argument("--fault", type=parse_fault, action="append", default=[], metavar="DEVICE:KEY=VALUE",
                   help="set a fault switch at start, e.g. boiler-1:scale=0.5, boiler-2:leak=0.3, "
                        "boiler-1:stuck=flow_temp, meter-1:tamper=1 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   type=str.upper, help="log level (default INFO)")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """A :class:`SimConfig` from parsed arguments."""
    faults: dict[str, dict[str, object]] = {}
    for device, key, value in args.fault:
        faults.setdefault(device, {})[key] = value
    return SimConfig(
        boilers=args.boilers, meters=args.meters, host=args.host, base_port=args.base_port,
        seed=args.seed, tick=args.tick, speed=args.speed, truth_log=args.truth_log,
        meter_start_kwh=args.meter_start_kwh, start_hour=args.start_hour, faults=faults,
    )


def _write_stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def serve(sim: Simulators) -> int:
    """Run until SIGINT/SIGTERM; return the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start()
    except SimulatorStartError as exc:
        log.error("cannot start simulators", error=str(exc))
        await asyncio.to_thread(sys.stderr.write, f"twin-sim: error: {exc}\n")
        return EXIT_USAGE
    try:
        # A launcher may be slow to read the pipe; keep the loop free meanwhile.
        await asyncio.to_thread(_write_stdout, json.dumps(sim.ready_message(), separators=(",", ":")))
        await stop.wait()
        log.info("stopping on signal")
    finally:
        await sim.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twin-sim`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        sim = Simulators(config_from_args(args))
    except (ValueError, FaultError) as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(serve(sim))
    except Exception:
        log.exception("simulators crashed")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

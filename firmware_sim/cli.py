"""``twin-sim``: run simulated boilers and meters as Modbus TCP servers, or on a Modbus RTU bus and
as IEC 62056-21 meters over pseudo-terminals.

Prints one JSON line ``{"event": "ready", "devices": [...]}`` on stdout once every device is
served; logs go to stderr. Exit codes: 0 after SIGINT/SIGTERM, 2 for bad options or a port, pty or
link that cannot be created, 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from firmware_sim.iec import BAUD_CHARS
from firmware_sim.inject import FAULT_KINDS, InjectSpec, parse_inject
from firmware_sim.line import LineSettings
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


def inject_spec(text: str) -> InjectSpec:
    """Parse ``[DEVICE:]kind=rate[,kind=rate...]`` (argparse ``type=``)."""
    try:
        return parse_inject(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``twin-sim`` argument parser."""
    p = argparse.ArgumentParser(
        prog="twin-sim",
        description="Simulated gas boilers and three-phase meters served over Modbus TCP "
                    "(unit id 1; device i, boilers first from 0, listens on base-port + i), or with --rtu "
                    "on one Modbus RTU bus over a pty (device i answers unit rtu-first-unit + i); "
                    "plus IEC 62056-21 mode C meters, each on its own pty.",
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
    p.add_argument("--pad-registers", type=int, default=0, metavar="N",
                   help="serve at least N input and holding registers from address 0, zeros beyond the "
                        "profile (default 0: reads past the profile get exception 2)")
    rtu = p.add_argument_group("Modbus RTU over a pseudo-terminal")
    rtu.add_argument("--rtu", action="store_true",
                     help="serve the boilers and meters on one RTU bus (a pty) instead of TCP")
    rtu.add_argument("--rtu-link", type=Path, metavar="PATH",
                     help="also make PATH a symlink to the bus' pty (e.g. /tmp/twin-rtu0)")
    rtu.add_argument("--rtu-first-unit", type=int, default=1, metavar="ID",
                     help="unit id of the first device (default 1)")
    rtu.add_argument("--baud", type=int, default=19200, help="RTU baud rate (default 19200)")
    rtu.add_argument("--parity", default="E", type=str.upper, choices=["N", "E", "O"],
                     help="RTU parity (default E)")
    rtu.add_argument("--stopbits", type=int, default=1, choices=[1, 2], help="RTU stop bits (default 1)")
    rtu.add_argument("--no-line-timing", dest="line_timing", action="store_false",
                     help="answer at once instead of emulating the wire time of the serial lines")
    iec = p.add_argument_group("IEC 62056-21 mode C meters over pseudo-terminals")
    iec.add_argument("--iec-meters", type=int, default=0, metavar="K",
                     help="number of IEC meters iec-meter-1..K, one pty each (default 0)")
    iec.add_argument("--iec-link-prefix", type=Path, metavar="PATH",
                     help="also make PATH1, PATH2, ... symlinks to the meters' ptys")
    iec.add_argument("--iec-address", metavar="ADDR",
                     help="answer only sign-ons without an address or with this one (default: any)")
    iec.add_argument("--iec-baud-char", default="5", choices=list(BAUD_CHARS),
                     help="baud-rate character offered in the identification: 0=300 ... 5=9600 (default), "
                          "6=19200")
    faults = p.add_argument_group("communication faults")
    faults.add_argument("--inject", type=inject_spec, action="append", default=[],
                        metavar="[DEVICE:]KIND=RATE[,...]",
                        help=f"inject faults with a probability per request; kinds: {', '.join(FAULT_KINDS)} "
                             "(e.g. --inject crc=0.01 --inject meter-1:timeout=0.1,exception=0.05; repeatable)")
    faults.add_argument("--dead-time", type=float, default=5.0, metavar="SECONDS",
                        help="how long an RTU device stays silent after an injected disconnect (default 5)")
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
        pad_registers=args.pad_registers, rtu=args.rtu, rtu_link=args.rtu_link,
        rtu_first_unit=args.rtu_first_unit,
        line=LineSettings(baudrate=args.baud, parity=args.parity, stopbits=args.stopbits),
        line_timing=args.line_timing, iec_meters=args.iec_meters, iec_link_prefix=args.iec_link_prefix,
        iec_address=args.iec_address, iec_baud_char=args.iec_baud_char, inject=tuple(args.inject),
        dead_time=args.dead_time,
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

"""``twin-edge``: run the edge agent or check its configuration."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from edge.agent import AgentStartError, run_agent
from edge.config import load_config
from edge.inference import check_local_models
from protocol.logs import configure_logging
from protocol.tomlconfig import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``twin-edge`` console script."""
    parser = argparse.ArgumentParser(prog="twin-edge", description="Digital-twin edge agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poll devices and forward readings to the broker")
    run.add_argument("--config", required=True, help="path to edge.toml")
    check = sub.add_parser("check-config", help="validate a configuration file and its profiles")
    check.add_argument("--config", required=True, help="path to edge.toml")
    prov = sub.add_parser("provision", help="fetch this gateway's identity, broker login and devices from the hub "
                                            "with a one-time claim code, and write edge.toml (mode 0600)")
    prov.add_argument("--hub", required=True, help="the hub's URL, e.g. https://hub.example.net")
    prov.add_argument("--code", required=True, help="the claim code shown to the technician at the hub")
    prov.add_argument("--out", default="edge.toml", help="configuration file to write (default: edge.toml)")
    prov.add_argument("--force", action="store_true", help="replace an existing configuration file")
    prov.add_argument("--ca-file", help="CA certificate to verify an https hub with (default: system trust store)")
    prov.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the hub (default: 30)")
    args = parser.parse_args(argv)
    if args.command == "provision":
        return _provision(args)

    try:
        cfg, profiles = load_config(args.config)
    except ConfigError as exc:
        print(f"twin-edge: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: OK — gateway {cfg.gateway.site}/{cfg.gateway.name}, "
              f"{len(cfg.devices)} device(s), buffer {cfg.buffer.path}, {len(cfg.models)} local model(s)")
        # A model the agent cannot use is not fatal (it runs without scoring that profile), so
        # these are warnings and the exit code stays 0.
        for problem in check_local_models(cfg, profiles):
            print(f"twin-edge: warning: {problem} (the agent would run without scoring this profile)",
                  file=sys.stderr)
        return 0
    configure_logging(cfg.log_level)
    try:
        asyncio.run(run_agent(cfg, profiles))
    except AgentStartError as exc:
        print(f"twin-edge: {exc}", file=sys.stderr)
        return 1
    return 0


def _provision(args: argparse.Namespace) -> int:
    # Imported here: the other commands do not need it.
    from edge.provision import ProvisionError, provision

    try:
        done = provision(args.hub, args.code, Path(args.out), force=args.force,
                         ca_file=Path(args.ca_file) if args.ca_file else None, timeout_s=args.timeout)
    except ProvisionError as exc:
        print(f"twin-edge: provisioning failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"twin-edge: provisioning failed: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    for warning in done.warnings:
        print(f"twin-edge: warning: {warning}", file=sys.stderr)
    config = f"{done.devices} device(s), configuration version {done.config_version}" \
        if done.config_version is not None else "no device configuration yet"
    # The password is in the file only; never on the terminal (it may be logged or filmed).
    print(f"provisioned gateway {done.site}.{done.gateway}: wrote {done.path} (mode 0600); broker {done.broker} "
          f"as user {done.username}; {config}. Start it with: twin-edge run --config {done.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

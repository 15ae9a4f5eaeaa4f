"""``twin-edge``: run the edge agent or check its configuration."""

from __future__ import annotations

import argparse
import asyncio
import sys

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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())

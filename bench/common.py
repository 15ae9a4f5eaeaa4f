"""What every benchmark shares: progress on stderr, the ``--quick`` switch, one JSON summary
line last on stdout (so scripts can take ``tail -1``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def log(msg: str) -> None:
    """Progress for the person watching; stdout is kept for the result."""
    print(msg, file=sys.stderr, flush=True)


def run_bench(prog: str, doc: str | None, body: Callable[[bool], Awaitable[dict[str, Any]]],
              argv: list[str] | None = None) -> int:
    """Parse ``--quick``, run ``body(quick)``, print its figures plus the run time as JSON."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=(doc or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = asyncio.run(body(args.quick))
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    return 0

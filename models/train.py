"""Train the anomaly models: ``python -m models.train {skab,sim} [options]``.

``skab``  choose and calibrate the SKAB recipe on ``--data`` (SKAB's ``data/`` folder), write
          ``models/shipped/skab-pump.recipe.json`` and its card, and measure it (through ONNX).
``sim``   train the simulator boiler and meter models on simulated normal operation, measure them
          on held-out simulated faults, and write ``models/shipped/sim-*-anomaly.onnx`` + cards.

Both are seeded (``--seed``) and reproducible: the same inputs give byte-identical outputs, except
for the ``created`` time in the cards.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "shipped"


def _skab(args: argparse.Namespace) -> int:
    from models.evaluate_skab import run_protocol
    from models.skab import iter_experiments
    from models.train_skab import train_skab, write_outputs

    experiments = list(iter_experiments(args.data))
    recipe, rows = train_skab(experiments, quantile=args.quantile, seed=args.seed)
    for r in rows:
        print(f"{r['family']:14s} threshold={r['threshold']:<8} F1={r['f1']:.3f} FAR={r['far']:5.1f}% "
              f"MAR={r['mar']:5.1f}%  {r['description']}")
    final = run_protocol(experiments, recipe, engine="onnx", progress=True).summary()
    path = write_outputs(recipe, rows, final, args.out)
    print(f"wrote {path} and {path.with_name('skab-pump.md')}")
    print(json.dumps({"family": recipe.family, "threshold": recipe.threshold, **final}))
    return 0


def _sim(args: argparse.Namespace) -> int:
    from models.train_sim import main as train_sim

    return train_sim(args)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="target", required=True)
    sk = sub.add_parser("skab", help="choose and calibrate the SKAB recipe")
    sk.add_argument("--data", type=Path, default=None,
                    help="SKAB data folder (default: $SKAB_DATA, else ../shared/datasets/skab/data)")
    sk.add_argument("--quantile", type=float, default=0.95,
                    help="threshold = this quantile of scores on normal data (default 0.95)")
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--out", type=Path, default=SHIPPED)
    sk.set_defaults(run=_skab)
    sm = sub.add_parser("sim", help="train the simulator boiler and meter models")
    sm.add_argument("--kind", choices=("boiler", "meter", "all"), default="all")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--quick", action="store_true", help="less training data (for tests); not for shipping")
    sm.add_argument("--out", type=Path, default=SHIPPED)
    sm.set_defaults(run=_sim)
    args = ap.parse_args(argv)
    if args.target == "skab" and args.data is None:
        from models.skab import skab_data_dir

        args.data = skab_data_dir()
    if args.target == "skab" and not args.data.is_dir():
        print(f"error: SKAB data folder {args.data} not found (see ../shared/datasets/skab/SOURCE.md)", file=sys.stderr)
        return 2
    rc: int = args.run(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

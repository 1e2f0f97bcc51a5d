"""The ``torchslim`` command.

Subcommands:

* ``torchslim demo``: train a small CNN on scikit-learn's digits (the main job).
* ``torchslim inspect PATH``: print a checkpoint's tensors and metadata.

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its
parser and sets ``run``; ``main`` only dispatches. The CLI uses the public API
only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits, resumable",
        description="Train a small CNN on scikit-learn's bundled 8x8 digits with a "
        "fixed train/held-out split, checkpointing into --logdir. Run it again "
        "and it continues from its latest checkpoint.",
    )
    p.add_argument("--logdir", default="runs/digits", help="where checkpoints go (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="target global step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    def run(args: argparse.Namespace) -> int:
        from torchslim import demo

        demo.main(logdir=args.logdir, number_of_steps=args.steps, seed=args.seed)
        return 0

    p.set_defaults(run=run)


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="print a checkpoint's tensors and metadata",
        description="Print the tensors (name, dtype, shape) and the metadata of a "
        "torchslim checkpoint. PATH is a checkpoint, or a logdir (its latest checkpoint).",
    )
    p.add_argument("path")

    def run(args: argparse.Namespace) -> int:
        from torchslim import checkpoint

        print(checkpoint.describe(args.path))
        return 0

    p.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchslim", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_inspect):
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"torchslim {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

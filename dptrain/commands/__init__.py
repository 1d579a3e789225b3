"""The subcommands of ``dptrain``: one module each, with ``register(sub)`` and ``run(args)``."""

from __future__ import annotations

import argparse


def add_overrides(p: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): recipe keys overridden on the command line."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe key, e.g. --set {example}",
    )

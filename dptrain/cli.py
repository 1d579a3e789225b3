"""The ``dptrain`` command line (minimal: the privacy subcommands)."""

from __future__ import annotations

import argparse
import sys

from dptrain.commands import privacy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dptrain", description="Differentially private training and privacy accounting."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    privacy.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dptrain`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

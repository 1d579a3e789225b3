"""The ``dptrain`` command line: one subcommand per module in ``dptrain.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "dptrain.commands.train",
    "dptrain.commands.privacy",
)

# Errors a user can fix; printed as one message, without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dptrain",
        description="Differentially private training, accounting and auditing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint and its ledger are intact; resume with --resume", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

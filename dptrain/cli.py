"""The ``dptrain`` command line: one subcommand per module in ``dptrain.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "dptrain.commands.train",
    "dptrain.commands.privacy",
    "dptrain.commands.federated",
    "dptrain.commands.audit",
    "dptrain.commands.check",
    "dptrain.commands.generate",
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: printed as one message naming the fix, without a traceback.
    Everything else is a bug and keeps its traceback."""
    from accountants import BudgetExceeded, LedgerError

    from .errors import UserError

    # the accountants package stands alone (no dptrain import): its input errors are listed here
    return (UserError, BudgetExceeded, LedgerError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dptrain",
        description="Differentially private training, accounting and auditing.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dptrain`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            "interrupted: the last checkpoint and its ledger are intact; continue with --resume RUN_DIR",
            file=sys.stderr,
        )
        return 130
    except user_errors() as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

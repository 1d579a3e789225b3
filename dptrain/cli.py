"""The ``dptrain`` command line: one subcommand per module in ``dptrain.commands``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator

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
    from accountants import (
        BudgetExceeded,
        DeltaBelowFloorError,
        EpsilonUnreachableError,
        LedgerError,
    )

    from .errors import UserError

    # the accountants package stands alone (no dptrain import): its input errors are listed here
    return (UserError, BudgetExceeded, LedgerError, EpsilonUnreachableError, DeltaBelowFloorError)


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


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    """Run ``dptrain`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # the subcommand's usage, not the top level's, says what it takes
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        with _input_warnings():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        from .errors import RunInterrupted

        if isinstance(err, RunInterrupted):
            print(f"interrupted: {err.message}", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as err:
        if args.debug:
            raise
        from .errors import USER_ERROR_EXIT

        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT


@contextlib.contextmanager
def _input_warnings() -> Iterator[None]:
    """Print each :class:`~dptrain.errors.InputWarning` as one ``warning: ...`` line."""
    from .errors import InputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if issubclass(category, InputWarning):
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())

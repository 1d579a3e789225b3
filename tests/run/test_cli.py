"""Every ``dptrain`` subcommand, in process: ``--help`` exits 0, a bad argument exits 2 with
argparse's message, a user error exits with USER_ERROR_EXIT and one ``error:`` line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dptrain.cli import build_parser, main
from dptrain.errors import USER_ERROR_EXIT

MISSING = "does-not-exist"  # under tmp_path: a recipe file or run directory that is not there

# per subcommand: arguments that parse (a missing recipe or run directory, or an unreachable
# target), so that adding --no-such-flag is the only bad argument
CASES: dict[str, list[str]] = {
    "train": [f"{MISSING}.yaml"],
    "check": [f"{MISSING}.yaml"],
    "federated": [f"{MISSING}.yaml"],
    "audit": [MISSING],
    "generate": [MISSING],
    "epsilon": ["--run", MISSING],
    "calibrate": "--epsilon 0.001 --delta 1e-12 --sample-rate 1 --steps 1000000".split(),
}


def test_every_subcommand_has_a_case():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(CASES)


@pytest.mark.parametrize("command", sorted(CASES))
def test_help_bad_argument_and_user_error_exit_codes(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dptrain {command}")

    assert main([command, *CASES[command], "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert f"dptrain {command}: error: unrecognized arguments: --no-such-flag" in err
    assert err.startswith(f"usage: dptrain {command} ")  # the subcommand's usage

    assert main([command, *CASES[command]]) == USER_ERROR_EXIT
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(("error: ", f"dptrain {command}: error: ")), err
    if command != "calibrate":
        assert MISSING in lines[0] and ("Fix:" in lines[0] or "not found" in lines[0]), err
    assert not list(Path(tmp_path).iterdir())  # a refused command writes nothing

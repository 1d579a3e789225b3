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


@pytest.mark.parametrize("command", ["train", "audit"])
def test_no_progress_silences_library_bars(command, tmp_path, monkeypatch):
    """``--no-progress`` turns off transformers' and huggingface_hub's own bars (a "loading
    weights" bar per model load) before anything loads, so the command prints only its lines."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    monkeypatch.chdir(tmp_path)
    try:
        hf_logging.enable_progress_bar()
        enable_progress_bars()
        assert main([command, *CASES[command]]) == USER_ERROR_EXIT  # bars stay as they were
        assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
        assert main([command, *CASES[command], "--no-progress"]) == USER_ERROR_EXIT
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
        enable_progress_bars()


def test_python_dash_m_runs_the_command_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "dptrain", "epsilon", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: dptrain epsilon")

"""`dptrain epsilon` and `dptrain calibrate`: JSON output, run directories, input errors."""

from __future__ import annotations

import json

import pytest

from accountants import Event, Ledger, get_accountant
from dptrain.cli import main

DELTA = 1e-5


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    return json.loads(lines[0])


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_epsilon_json(capsys, name: str) -> None:
    args = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000"]
    out = run_json(capsys, *args, "--delta", "1e-5", "--accountant", name)
    expected = get_accountant(name).epsilon([Event(0.01, 1.0, 1000)], DELTA)
    assert out["epsilon"] == expected
    assert out["delta"] == DELTA and out["accountant"] == name and out["steps"] == 1000
    assert out["events"] == [Event(0.01, 1.0, 1000).to_dict()]


def test_epsilon_prv_reports_upper_bound(capsys) -> None:
    out = run_json(
        capsys, "epsilon", "--sample-rate", "0.1", "--noise-multiplier", "3", "--steps", "10",
        "--delta", "1e-5", "--accountant", "prv",
    )  # fmt: skip
    lower, upper = get_accountant("prv").epsilon_bounds([Event(0.1, 3.0, 10)], DELTA)
    assert out["epsilon"] == upper > lower


def test_epsilon_phases(capsys) -> None:
    out = run_json(
        capsys, "epsilon", "--sample-rate", "0.01", "--phase", "1.0:500", "--phase", "2.0:500",
        "--phase", "5:10:0.5", "--delta", "1e-5",
    )  # fmt: skip
    events = [Event(0.01, 1.0, 500), Event(0.01, 2.0, 500), Event(0.5, 5.0, 10)]
    assert out["steps"] == 1010
    assert out["events"] == [e.to_dict() for e in events]
    assert out["epsilon"] == get_accountant("rdp").epsilon(events, DELTA)


def test_epsilon_adaptive(capsys) -> None:
    args = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "100"]
    out = run_json(capsys, *args, "--delta", "1e-5", "--adaptive")
    assert out["adaptive"] is True
    assert out["epsilon"] == get_accountant("rdp").adaptive_epsilon([Event(0.01, 1.0, 100)], DELTA)
    code, _, err = run(capsys, *args, "--delta", "1e-5", "--adaptive", "--accountant", "pld")
    assert code == 2 and "--adaptive" in err


def test_epsilon_infinite_and_free(capsys) -> None:
    args = ["epsilon", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"]
    assert run_json(capsys, *args, "--noise-multiplier", "0")["epsilon"] == "inf"  # strict JSON
    assert run_json(capsys, *args, "--noise-multiplier", "inf")["epsilon"] == 0.0


def test_epsilon_human_table(capsys) -> None:
    code, out, _ = run(
        capsys, "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "1000",
        "--delta", "1e-5",
    )  # fmt: skip
    assert code == 0
    assert "epsilon" in out and "q=0.01 sigma=1 steps=1000" in out
    assert f"{get_accountant('rdp').epsilon([Event(0.01, 1.0, 1000)], DELTA):.4f}" in out


def test_epsilon_of_a_run(tmp_path, capsys) -> None:
    ledger = Ledger([Event(0.01, 1.0, 300), Event(0.01, 2.0, 200)])
    ledger.save(tmp_path / "ledger.json")
    (tmp_path / "run.json").write_text(json.dumps({"delta": 1e-6, "accountant": "pld"}))
    out = run_json(capsys, "epsilon", "--run", str(tmp_path))
    assert out["delta"] == 1e-6 and out["accountant"] == "pld" and out["steps"] == 500
    assert out["epsilon"] == get_accountant("pld").epsilon(ledger.events, 1e-6)
    assert out["composition"].startswith("exact")
    # explicit flags win over run.json
    out = run_json(
        capsys, "epsilon", "--run", str(tmp_path), "--delta", "1e-5", "--accountant", "rdp"
    )
    assert out["epsilon"] == get_accountant("rdp").epsilon(ledger.events, DELTA)


def test_epsilon_of_a_person_level_run_reports_the_guarantee_per_person(tmp_path, capsys) -> None:
    """Strategy example: the ledger is per record, and the run's guarantee is per patient by
    group privacy over k records, k times the ledger's epsilon; it was reported as the bare
    per-record epsilon (marked a guarantee).  Strategy user: the ledger is over people."""
    import math

    ledger = Ledger([Event(0.01, 1.0, 300)])
    ledger.save(tmp_path / "ledger.json")
    unit = {"unit": "patient", "field": "patient_id", "strategy": "example", "group_size": 8}
    unit["max_records_per_person"] = 8  # k is the recipe's cap, public
    (tmp_path / "run.json").write_text(
        json.dumps({"delta": 1e-8, "accountant": "rdp", "privacy_unit": unit})
    )
    out = run_json(capsys, "epsilon", "--run", str(tmp_path))
    eps = get_accountant("rdp").epsilon(ledger.events, 1e-8)
    assert out["epsilon"] == eps and out["epsilon_unit"] == "record"
    person = out["per_unit"]
    assert person["unit"] == "patient" and person["epsilon"] == pytest.approx(8 * eps)
    assert person["delta"] == pytest.approx(
        out["delta_total"] * math.expm1(8 * eps) / math.expm1(eps)
    )
    code, text, _ = run(capsys, "epsilon", "--run", str(tmp_path))
    assert code == 0 and "epsilon per record" in text and f"({8 * eps:.4f}," in text
    (tmp_path / "run.json").write_text(
        json.dumps({"delta": 1e-8, "privacy_unit": {**unit, "strategy": "user", "group_size": 1}})
    )
    out = run_json(capsys, "epsilon", "--run", str(tmp_path))
    assert out["per_unit"]["epsilon"] == out["epsilon"] and out["epsilon_unit"] == "person"
    (tmp_path / "run.json").write_text(json.dumps({"delta": 1e-8}))  # a record-level run
    out = run_json(capsys, "epsilon", "--run", str(tmp_path))
    assert out["privacy_unit"] == "record" and "per_unit" not in out


def test_epsilon_refuses_an_uncapped_example_run_of_an_older_version(tmp_path, capsys) -> None:
    """Older versions ran strategy example without a cap, k the training data's largest
    count of records of one person: a private statistic the run published and calibrated
    to, so no per-person claim follows; refused, naming the fix (recipes now require it)."""
    Ledger([Event(0.01, 1.0, 300)]).save(tmp_path / "ledger.json")
    unit = {"unit": "patient", "field": "patient_id", "strategy": "example", "group_size": 28}
    for cap in ({"max_records_per_person": None}, {}, {"max_records_per_person": 30}):
        meta = {"delta": 1e-8, "accountant": "rdp", "privacy_unit": {**unit, **cap}}
        (tmp_path / "run.json").write_text(json.dumps(meta))
        code, _, err = run(capsys, "epsilon", "--run", str(tmp_path))
        assert code != 0 and "a private statistic" in err and "max_records_per_person" in err


def test_epsilon_of_a_warm_started_run_states_the_shared_guarantee(tmp_path, capsys) -> None:
    """A warm-started rl run's records shared with its source are covered only by both runs'
    composition (run.json's shared_with_warm_start): the command states it beside its own."""
    Ledger([Event(0.01, 1.0, 30)]).save(tmp_path / "ledger.json")
    shared = {"run": "runs/a", "epsilon": 16.0, "delta": 2e-5}
    meta = {"delta": 1e-5, "adaptive": True, "epsilon_budget": 8.0}
    (tmp_path / "run.json").write_text(json.dumps({**meta, "shared_with_warm_start": shared}))
    out = run_json(capsys, "epsilon", "--run", str(tmp_path))
    assert out["epsilon"] == 8.0 and out["shared_with_warm_start"] == shared
    code, text, _ = run(capsys, "epsilon", "--run", str(tmp_path))
    assert code == 0 and "(16.0, 2e-05)-DP for records shared with runs/a" in text


def test_epsilon_of_many_mechanisms_says_it_is_gridded(tmp_path, capsys) -> None:
    """A ledger of 80 distinct mechanisms (more than PLD's 64 exact ones) composes on the
    public grid, and the report says so."""
    ledger = Ledger([Event(0.01, 2.0 * 0.75 ** (t / 80)) for t in range(80)])
    ledger.save(tmp_path / "ledger.json")
    (tmp_path / "run.json").write_text(json.dumps({"delta": 1e-5, "accountant": "pld"}))
    out = run_json(capsys, "epsilon", "--run", str(tmp_path))
    assert out["epsilon"] == get_accountant("pld").epsilon(ledger.events, DELTA)
    assert out["composition"].startswith("gridded composition (level 0")
    code, text, _ = run(capsys, "epsilon", "--run", str(tmp_path))
    assert code == 0 and "gridded composition" in text


def test_run_errors(tmp_path, capsys) -> None:
    code, out, err = run(capsys, "epsilon", "--run", str(tmp_path / "missing"))
    assert code == 2 and out == "" and "no such run directory" in err

    code, _, err = run(capsys, "epsilon", "--run", str(tmp_path))  # no ledger.json
    assert code == 2 and "ledger.json" in err and "does not exist" in err

    (tmp_path / "ledger.json").write_text('{"format": "dptrain.ledger", "version": 1, "ev')
    code, _, err = run(capsys, "epsilon", "--run", str(tmp_path), "--delta", "1e-5")
    assert code == 2 and "not valid JSON" in err and "Traceback" not in err

    Ledger([Event(0.01, 1.0, 10)]).save(tmp_path / "ledger.json")
    code, _, err = run(capsys, "epsilon", "--run", str(tmp_path))  # no run.json, no --delta
    assert code == 2 and "--delta" in err

    (tmp_path / "run.json").write_text("{not json")
    code, _, err = run(capsys, "epsilon", "--run", str(tmp_path))
    assert code == 2 and "run.json" in err

    code, _, err = run(capsys, "epsilon", "--run", str(tmp_path), "--steps", "5", "--delta", "1e-5")
    assert code == 2 and "--run" in err


@pytest.mark.parametrize(
    ("argv", "flag", "hint"),
    [
        (
            ["--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10"],
            "--sample-rate",
            "(0, 1]",
        ),
        (
            ["--sample-rate", "0", "--noise-multiplier", "1", "--steps", "10"],
            "--sample-rate",
            "(0, 1]",
        ),
        (
            ["--sample-rate", "0.01", "--noise-multiplier", "-1", "--steps", "10"],
            "--noise-multiplier",
            "negative",
        ),
        (
            ["--sample-rate", "0.01", "--noise-multiplier", "nan", "--steps", "10"],
            "--noise-multiplier",
            "NaN",
        ),
        (
            ["--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "0"],
            "--steps",
            "positive",
        ),
        (
            ["--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "1.5"],
            "--steps",
            "integer",
        ),
        (["--sample-rate", "0.01", "--phase", "1.0x500"], "--phase", "NOISE:STEPS"),
        (["--sample-rate", "0.01", "--phase", "1.0:abc"], "--phase", "NOISE:STEPS"),
        (["--sample-rate", "0.01", "--phase", "1:5:2"], "--phase", "(0, 1]"),
        (["--phase", "1.0:500"], "--sample-rate", "RATE"),
        (
            ["--sample-rate", "0.01", "--phase", "1:5", "--steps", "5"],
            "--phase",
            "cannot be combined",
        ),
        (["--sample-rate", "0.01", "--noise-multiplier", "1"], "--steps", "missing"),
    ],
)
def test_bad_input_names_the_flag(capsys, argv, flag, hint) -> None:
    code, out, err = run(capsys, "epsilon", *argv, "--delta", "1e-5")
    assert code == 2 and out == ""
    assert flag in err and hint in err and "Traceback" not in err


@pytest.mark.parametrize("delta", ["0", "1", "-1e-5", "2", "x"])
def test_bad_delta(capsys, delta: str) -> None:
    args = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10"]
    code, _, err = run(capsys, *args, f"--delta={delta}")
    assert code == 2 and "--delta" in err and "(0, 1)" in err


def test_missing_delta(capsys) -> None:
    args = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "--delta" in err


def test_calibrate_json(capsys) -> None:
    out = run_json(
        capsys, "calibrate", "--epsilon", "8", "--delta", "1e-5", "--sample-rate", "0.01",
        "--steps", "1000", "--accountant", "pld",
    )  # fmt: skip
    sigma = out["noise_multiplier"]
    acc = get_accountant("pld")
    assert out["epsilon"] == acc.epsilon([Event(0.01, sigma, 1000)], DELTA) <= 8.0
    assert acc.epsilon([Event(0.01, sigma * (1 - 1e-3), 1000)], DELTA) > 8.0
    assert out["target_epsilon"] == 8.0 and out["accountant"] == "pld" and out["steps"] == 1000


def test_calibrate_errors(capsys) -> None:
    base = ["calibrate", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100"]
    code, _, err = run(capsys, *base, "--epsilon", "-1")
    assert code == 2 and "--epsilon" in err
    code, _, err = run(capsys, *base)
    assert code == 2 and "--epsilon" in err
    code, out, _ = run(capsys, *base, "--epsilon", "2")
    assert code == 0 and "noise multiplier" in out


def test_calibrate_unreachable_target_is_an_error_and_a_bug_is_a_bug(capsys, monkeypatch) -> None:
    import dptrain.commands.privacy as privacy
    from accountants import EpsilonUnreachableError

    code, _, err = run(
        capsys, "calibrate", "--epsilon", "1e-9", "--delta", "1e-5", "--sample-rate", "1",
        "--steps", "1000",
    )  # fmt: skip
    assert code == 2 and "no noise multiplier up to 1e+06 reaches epsilon" in err
    assert issubclass(EpsilonUnreachableError, ValueError)  # callers catching ValueError still do

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(privacy, "calibrate_noise", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # not turned into a user error
        main(
            [
                "calibrate",
                "--epsilon",
                "2",
                "--delta",
                "1e-5",
                "--sample-rate",
                "0.01",
                "--steps",
                "100",
            ]
        )


def test_epsilon_at_a_delta_below_the_pld_floor_is_a_user_error(capsys) -> None:
    code, out, err = run(
        capsys, "epsilon", "--sample-rate", "1", "--noise-multiplier", "5", "--steps", "1000",
        "--delta", "1e-12", "--accountant", "pld",
    )  # fmt: skip
    assert code == 2 and out == ""
    assert "floating-point floor" in err and "'rdp' accountant" in err
    assert "Traceback" not in err

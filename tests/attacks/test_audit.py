"""Whole audits of tiny runs: a non-private run with canaries, the same run with a ledger that
under-reports on purpose, and a DP run at epsilon 1 audited right after training."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest

import accountants
from accountants import Event, Ledger
from attacks.audit import after_training, audit_run
from attacks.report import verdict
from dptrain.cli import main
from dptrain.plan import CalibratedNoise, plan_privacy
from dptrain.recipe import load_recipe, parse_recipe
from dptrain.rundir import RunDir
from dptrain.train import train

TINY = "tiny-llama:num_hidden_layers=1,hidden_size=32,intermediate_size=64,vocab=512"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/attacks/conftest.py


def tiny_recipe(out: Path, *, private: bool, canaries=None, steps: int = 60, **audit):
    d = {
        "name": out.name,
        "output_dir": str(out),
        "model": {"name": TINY},
        "data": {
            "path": "bundled:clinic_notes",
            "max_length": 40,
            "max_records": 32,
            "max_validation_records": 8,
            "canaries": {"secret_digits": 2, "repetitions": canaries or {1: 128, 8: 2}},
        },
        # q = 32 / N with N = 32 records + every configured canary record (those left out by
        # their coins too, so N shows no coin): 176, q ~ 0.18; 60 steps see each record ~ 11
        # times (the non-private run takes 95: ~ 17 times, enough to memorize without noise)
        "training": {
            "steps": steps,
            "batch_size": 32,
            "physical_batch_size": 64,
            "lr": 0.02,
            "checkpoint_every": 1000,
            "log_every": 20,
        },
        # sigma = 10 spends epsilon ~ 1 here (given, not calibrated: calibration costs seconds)
        "policy": {"clip": 1.0, "noise_multiplier": 10.0}
        if private
        else {"clip": math.inf, "noise_multiplier": 0},
        "privacy": {"epsilon": 1.0 if private else math.inf, "delta": 1e-6},
        "audit": {"members": 32, "non_members": 64, "population": 32, **audit},
    }
    return parse_recipe(d)


@pytest.fixture(scope="module")
def non_private(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "nonprivate"
    # the canaries come from a fresh secret key each run: the never-inserted baseline averages
    # 32 of them (its mean exposure is 1.44 +- 0.25 bits), not a 2-canary draw that exceeds 3
    # bits in about 7% of runs
    train(tiny_recipe(out, private=False, exposure_canaries=32, steps=95), progress=False)
    return out


def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_private_run_shows_memorization_in_plain_words(non_private):
    table = io.StringIO()
    s = audit_run(non_private, progress=False, out=table)
    assert not s["privacy_guarantee"] and math.isinf(s["accountant_epsilon"])
    assert s["best_auc"] > 0.95
    c = s["canaries"]
    assert c["max_exposure"] == pytest.approx(math.log2(100))
    assert c["exposure_by_repetitions"]["8"] > 0.9 * c["max_exposure"]  # the secret is out
    assert c["exposure_by_repetitions"]["0"] < 3.0  # canaries never trained on stay hidden
    one_run = s["epsilon_lower_bounds"]["one_run"]
    assert one_run["canaries"] == 128 and one_run["confidence"] == 0.95
    # far above what a DP run at epsilon 1 may show (its bound must stay below 1)
    assert one_run["epsilon"] > 2.0
    assert one_run["correct"] >= 0.95 * one_run["guesses"]
    # outputs: strict JSON, self-contained HTML with embedded PNGs, a terminal table
    summary = _strict_json(non_private / "audit" / "summary.json")
    for key in ("accountant_epsilon", "delta", "empirical_epsilon_lower_bound", "confidence"):
        assert key in summary
    assert summary["accountant_epsilon"] == "inf"
    for a in summary["attacks"].values():
        assert {"auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"} <= set(a)
    page = (non_private / "audit" / "report.html").read_text()
    assert "NO privacy guarantee" in page and "class='box none'" in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 4
    assert not re.search(r"(src|href)=['\"]?https?:", page)
    out = table.getvalue()
    assert "LiRA offline" in out and "epsilon >= (one run" in out and "NO privacy guarantee" in out


def test_a_ledger_that_under_reports_is_flagged_in_red(non_private, tmp_path):
    run = tmp_path / "lying"
    shutil.copytree(non_private, run, ignore=shutil.ignore_patterns("audit"))
    meta = RunDir(run).read_meta()
    Ledger([Event(meta["sample_rate"], 30.0, meta["steps"])]).save(run / "ledger.json")
    s = audit_run(run, progress=False, out=io.StringIO())
    assert s["privacy_guarantee"] and s["accountant_epsilon"] < 1.0
    assert s["privacy_bug_suspected"]
    assert s["empirical_epsilon_lower_bound"] > s["accountant_epsilon"]
    page = (run / "audit" / "report.html").read_text()
    assert "class='box bug'" in page and "LIKELY PRIVACY BUG" in page
    assert verdict(s)[1][1].startswith("False alarms: at 95% confidence a correct run")
    # a reproducible run's report says first that its seed voids the guarantee
    level, words = verdict({**s, "claim": {**s["claim"], "insecure_seed": 7}})
    assert level == "bug" and "insecure_seed=7" in words[0] and "NO privacy" in words[0]
    assert "insecure_seed" not in " ".join(verdict(s)[1])


def test_dp_run_audited_after_training_stays_below_its_epsilon(tmp_path, capsys):
    out = tmp_path / "dp"
    recipe = tiny_recipe(
        out, private=True, canaries={1: 64, 4: 1}, steps=20, after_training=True, shadows=2,
        shadow_steps=5, members=16, non_members=32, population=16, whitebox=True,
        whitebox_canaries=200, whitebox_simulations=4, confidence=0.999,
    )  # fmt: skip
    # a correct run fails a test at confidence c with probability up to 1 - c: at the default
    # 0.95 the white-box f-DP test flagged this run in about 1 of 20-100 CI runs (0.874 > 0.654
    # once; 20 reruns of the same configuration: none flagged, largest bound 0.51)
    result = train(recipe, progress=False)
    assert result.finished and not (out / "audit" / "summary.json").exists()
    after_training(result.run_dir, recipe.audit, progress=False)  # what `dptrain train` runs
    assert 0.5 < result.epsilon <= 1.0
    s = _strict_json(out / "audit" / "summary.json")  # written by the audit after training
    assert s["accountant_epsilon"] == pytest.approx(result.epsilon)
    assert s["empirical_epsilon_lower_bound"] <= s["accountant_epsilon"]
    assert not s["privacy_bug_suspected"]
    assert {"lira_online", "rmia_online"} <= set(s["attacks"])
    page = (out / "audit" / "report.html").read_text()
    assert "class='box ok'" in page
    # how often a correct run is flagged, next to the verdict: each test at 0.999, the rates
    # add (the white-box audit's bound, its sampling and noise checks at a twentieth of it
    # each, and its key replay check at 1e-9)
    fa = s["false_alarm"]
    assert fa["per_test"] == pytest.approx(
        {"one_run": 1e-3, "clopper_pearson": 1e-3, "whitebox": 1.1e-3 + 1e-9}
    )
    assert fa["at_most"] == pytest.approx(3.1e-3 + 1e-9) and "union bound" in fa["combination"]
    level, words = verdict(s)
    assert level == "ok" and words[1].startswith(
        "False alarms: at 99.9% confidence a correct run is flagged with probability at most "
        "0.31% (0.1% for the one-run bound + 0.1% for the Clopper-Pearson bound (nominal) + "
        "0.11% for the white-box audit; each test is stated at that confidence, not corrected "
        "for the others; a flag from any of them is the verdict, so their rates add)"
    )
    assert sum(w.startswith("False alarms") for w in words) == 1  # not the white-box's too
    assert "probability at most 0.31%" in page
    assert s["whitebox"]["false_alarm"]["per_test"] == pytest.approx(
        {"ledger_bound": 1e-3, "sampling_check": 5e-5, "noise_check": 5e-5, "key_replay": 1e-9}
    )
    # the white-box audit of the same configuration, beside the others
    w = s["whitebox"]
    assert w["canaries"] == 200 and w["steps"] == result.steps and not w["privacy_bug_suspected"]
    assert w["claimed_epsilon"] == pytest.approx(result.epsilon, rel=1e-6)
    assert "White-box audit of the privacy configuration" in page
    assert (out / "audit" / "whitebox.json").exists()
    # shadow models are cached and reused by the next audit
    adapters = sorted((out / "audit" / "shadows").glob("shadow-*/final/*.safetensors"))
    assert len(adapters) == 2
    stamps = [p.stat().st_mtime_ns for p in adapters]
    capsys.readouterr()
    again = audit_run(out, progress=False, out=io.StringIO())
    assert "training shadow" not in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in adapters] == stamps
    assert again["attacks"]["lira_online"]["auc"] == pytest.approx(
        s["attacks"]["lira_online"]["auc"]
    )


def test_cli(non_private, tmp_path, capsys):
    assert main(["audit", str(non_private), "--no-progress", "--members", "16"]) == 0
    assert "audit of" in capsys.readouterr().out
    assert _strict_json(non_private / "audit" / "summary.json")["records"]["n_members"] == 16
    assert main(["audit", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["audit", str(non_private), "--shadows", "3"]) == 2
    assert "--shadows" in capsys.readouterr().err


def test_shadows_with_the_runs_plan_reuse_its_calibrated_sigma(tmp_path, capsys, monkeypatch):
    """Counted through ``accountants.calibrate_noise`` (the static policy's calibrate): the run
    calibrates once; its shadow models, whose plan is the run's (epsilon, delta, q, steps,
    accountant, policy), take that sigma from run.json; a plan differing in one value (the
    steps, as ``shadow_steps`` would) calibrates."""
    calls: list[tuple] = []
    real = accountants.calibrate_noise

    def counted(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(accountants, "calibrate_noise", counted)
    out = tmp_path / "cal"
    d = tiny_recipe(
        out, private=True, canaries={1: 8}, steps=2, after_training=True, shadows=2,
        members=8, non_members=8, population=8, exposure_canaries=2,
    ).model_dump()  # fmt: skip
    d["policy"]["noise_multiplier"] = None  # calibrated for epsilon 1
    recipe = parse_recipe(d)
    result = train(recipe, progress=False)
    meta = RunDir(result.run_dir).read_meta()
    sigma = meta["calibrated_noise_multiplier"]
    assert len(calls) == 1 and f"calibrated noise multiplier {sigma:.4f}" in capsys.readouterr().err
    after_training(result.run_dir, recipe.audit, progress=False)
    err = capsys.readouterr().err
    assert len(calls) == 1 and "calibrated noise multiplier" not in err
    assert err.count(f"reused noise multiplier {sigma:.4f}") == 2
    shadow_dir = out / "audit" / "shadows" / "shadow-00"
    assert RunDir(shadow_dir).read_meta()["calibrated_noise_multiplier"] == sigma
    shadow = load_recipe(shadow_dir / "recipe.yaml")
    known = CalibratedNoise.of_run(meta, recipe)
    assert plan_privacy(shadow, 100, calibrated=known).noise_multiplier == sigma
    other = parse_recipe(
        {**shadow.model_dump(), "training": {**shadow.training.model_dump(), "steps": 3}}
    )
    plan = plan_privacy(other, 100, calibrated=known)
    assert plan.noise_source == "calibrated" and len(calls) == 2 and plan.noise_multiplier > sigma

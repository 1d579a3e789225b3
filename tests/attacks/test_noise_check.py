"""The noise check (:mod:`attacks.noise_check`): its false-alarm rate on exact Gaussian noise
is at most its level, and it catches the noise bugs no one-run bound sees (10% too little,
tails truncated at 3 std, a step's draws replayed), through the real engine."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from attacks.noise_check import NoiseCheck, replay_across_runs, replay_verdict
from attacks.planted import run_one
from attacks.report import whitebox_verdict
from dptrain.secret import RunKey


def _check(rng: np.random.Generator, steps: int, width: int, draw=None) -> NoiseCheck:
    check = NoiseCheck(steps, sketch=64, keep=16)
    for _ in range(steps):
        check.update(draw(rng, width) if draw else rng.standard_normal(width))
    return check


def test_false_alarms_on_exact_noise_stay_below_the_level():
    """400 simulated correct runs at 90% confidence: each test's p-value is exact or
    conservative (chi^2, binomial, Beta cosines) and Bonferroni splits alpha, so at most 10%
    are flagged (with sampling slack: 40 +- 6)."""
    rng = np.random.default_rng(0)
    flags = [_check(rng, 24, 2048).result(0.90)["flagged"] for _ in range(400)]
    assert np.mean(flags) <= 0.10 + 3 * np.sqrt(0.1 * 0.9 / 400)
    # each p-value is (close to) uniform: the scale test's over these runs
    ps = [_check(rng, 8, 512).result(0.9)["tests"]["scale"]["p_value"] for _ in range(300)]
    assert stats.kstest(ps, "uniform").pvalue > 1e-3


@pytest.mark.parametrize(
    "bug,failed",
    [
        ("scaled", {"scale"}),
        ("truncated", {"scale", "tail_3"}),
        ("replayed", {"freshness"}),
        ("negated", {"freshness"}),
    ],
)
def test_each_noise_bug_fails_its_test(bug, failed):
    rng = np.random.default_rng(1)
    first = rng.standard_normal(4096)
    draws = {
        "scaled": lambda r, n: 0.9 * r.standard_normal(n),
        "truncated": lambda r, n: stats.truncnorm.rvs(-3, 3, size=n, random_state=r),
        "replayed": lambda r, n: first,
        "negated": lambda r, n: first * r.choice([-1.0, 1.0]),  # antithetic steps cancel
    }
    res = _check(rng, 40, 4096, draws[bug]).result(0.95)
    assert res["flagged"] and failed <= set(res["failed"])
    assert res["alpha_per_test"] == pytest.approx(0.05 / len(res["tests"]))


def test_tails_are_tested_only_where_enough_values_are_expected():
    check = _check(np.random.default_rng(2), 10, 1000)  # 10^4 values
    tails = {t["k"] for t in check._tails()}
    assert tails == {2.0, 3.0}  # N P(|z| > 4) = 0.6 < 25


def test_equal_noise_in_two_tensors_of_a_step_fails_the_tensor_test():
    rng = np.random.default_rng(3)
    check = NoiseCheck(10)
    for t in range(10):
        row = rng.standard_normal(128)
        third = row if t == 7 else rng.standard_normal(128)  # step 7: tensor 2 repeats tensor 0
        blocks = np.stack([row, rng.standard_normal(128), third])
        check.update(rng.standard_normal(4096), blocks)
    res = check.result(0.95)
    assert res["failed"] == ["tensors"] and res["tests"]["tensors"]["at"] == [7, 0, 2]
    assert res["tests"]["tensors"]["pairs"] == 30


def test_bad_input_is_refused():
    check = NoiseCheck(3)
    check.update(np.zeros(10) + 1)
    with pytest.raises(ValueError, match="has 9 values"):
        check.update(np.ones(9))
    with pytest.raises(ValueError, match="not finite"):
        check.update(np.full(10, np.nan))
    assert not NoiseCheck(3).result(0.95)["applicable"]


@pytest.mark.parametrize(
    "bug,records",
    [
        ("none", 0),
        ("noise*0.9", 0),
        ("truncated", 0),
        ("replayed", 0),
        ("per-tensor", 0),
        ("none", 32),
    ],
)
def test_real_engine_noise_bugs_are_caught_and_a_correct_run_is_not(bug, records, one_thread):
    """Canary-only runs of the MLP through the real engine (40 steps, q = 1/2, 64 canaries,
    claimed epsilon 8): the ledger bound sees none of these bugs; the noise check sees each.
    With records in the batch no coordinate carries noise alone: not applicable."""
    r = run_one(bug, epsilon=8.0, q=0.5, steps=40, canaries=64, seed=0, records=records)
    noise = r["noise"]
    assert not r["bound_rejects_claim"]
    if records:
        assert not noise["applicable"] and "records in the batch" in noise["reason"]
        return
    assert noise["applicable"] and noise["steps"] == 40
    assert noise["flagged"] is (bug != "none") and r["privacy_bug_suspected"] is (bug != "none")
    assert r["false_alarm_at_most"] == pytest.approx(0.055)
    expected = {
        "none": set(),
        "noise*0.9": {"scale"},
        "truncated": {"scale", "tail_3"},
        "replayed": {"freshness"},
        "per-tensor": {"tensors"},
    }
    assert expected[bug] <= set(noise["failed"])
    assert noise["tests"]["tensors"]["pairs"] == 40  # the two weight matrices, every step
    if bug == "noise*0.9":
        assert noise["tests"]["scale"]["variance_ratio"] == pytest.approx(0.81, abs=0.01)
    level, words = whitebox_verdict(r)
    text = " ".join(words)
    assert (level == "bug") is (bug != "none") and "Noise check (" in text
    assert ("the released noise is not the claimed Gaussian" in text) is (bug != "none")


def test_keys_made_from_the_recipe_seed_are_flagged_only_when_they_claim_secrecy():
    fresh = replay_verdict(replay_across_runs(RunKey.generate, seed=0), 1e-9)
    assert not fresh["replayed"] and not fresh["flagged"] and fresh["secure_keys"]

    def seeded_secure() -> RunKey:  # the bug: a "secret" key drawn from the seeded torch RNG
        import torch

        return RunKey(bytes(torch.randint(0, 256, (32,), dtype=torch.uint8).tolist()))

    bad = replay_verdict(replay_across_runs(seeded_secure, seed=7), 1e-9)
    assert bad["same_key"] and bad["noise_cosine"] == pytest.approx(1.0) and bad["flagged"]
    insecure = replay_verdict(replay_across_runs(lambda: RunKey.from_insecure_seed(3), 3), 1e-9)
    assert insecure["replayed"] and not insecure["flagged"]  # public by design, reported so

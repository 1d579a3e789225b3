"""The sampling-consistency check (attacks.sampling): its statistic, its false-alarm rate on
simulated Poisson runs, its power on simulated and real shuffled runs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from attacks.planted import FixedBatches, run_one
from attacks.report import whitebox_verdict, write_whitebox
from attacks.sampling import InclusionCheck, epoch_kernel, shuffler_shift


def projections(rng, members, steps, q, mu, *, shuffle=False):
    """``z_it = mu I_it + N(0, 1)`` of ``members`` canaries over ``steps`` steps: Poisson
    inclusions, or a shuffle per epoch of ``1 / q`` steps (each member in exactly one)."""
    if shuffle:
        k = round(1 / q)
        slot = np.concatenate([rng.integers(0, k, (1, members)) for _ in range(0, steps, k)])
        inside = (np.arange(steps)[:, None] % k == slot[np.arange(steps) // k]).astype(float)
    else:
        inside = (rng.random((steps, members)) < q).astype(float)
    return mu * inside + rng.standard_normal((steps, members))


def check(z, q):
    c = InclusionCheck(z.shape[1], q, z.shape[0])
    for row in z:
        c.update(row)
    return c


def test_streaming_statistic_is_the_formula():
    rng = np.random.default_rng(0)
    q, steps = 0.25, 11
    z = projections(rng, 20, steps, q, 1.3)
    w = epoch_kernel(q, steps)
    np.testing.assert_allclose(w, [0.75, 0.5, 0.25])
    y = z - z.mean(1, keepdims=True)
    s2 = (y**2).sum(1) / (z.shape[1] - 1)
    pairs = [(t, lag) for t in range(steps) for lag in range(1, 4) if t >= lag]
    num = sum(w[lag - 1] * y[t] @ y[t - lag] for t, lag in pairs)
    var = sum(w[lag - 1] ** 2 * s2[t] * s2[t - lag] for t, lag in pairs)
    c = check(z, q)
    assert c.z_score() == pytest.approx(num / np.sqrt((z.shape[1] - 1) * var))


@pytest.mark.parametrize(
    "members,steps,q,mu", [(8, 2, 0.5, 1.0), (8, 8, 0.5, 10.0), (32, 16, 0.25, 3.0)]
)
def test_poisson_runs_pass_at_the_stated_false_alarm_rate(members, steps, q, mu):
    """1000 simulated Poisson runs: Z is standard normal whatever the signal (mu = 10: the
    noise at a tenth of the canary), so at 95% confidence about 5% are flagged, no more."""
    rng = np.random.default_rng([members, steps])
    results = [check(projections(rng, members, steps, q, mu), q) for _ in range(1000)]
    zs = np.array([c.z_score() for c in results])
    assert abs(zs.mean()) < 0.1 and zs.std() == pytest.approx(1.0, abs=0.08)
    flagged = np.mean([c.result(0.95, mu=mu)["flagged"] for c in results])
    # binomial(1000, 0.05): above 0.068 with probability < 0.5%
    assert flagged <= 0.068
    assert flagged == pytest.approx(np.mean(stats.norm.cdf(zs) < 0.05))


def test_shuffled_runs_are_flagged_as_predicted():
    rng = np.random.default_rng(1)
    members, steps, q, mu = 500, 4, 0.5, 1.5
    zs = [check(projections(rng, members, steps, q, mu, shuffle=True), q) for _ in range(100)]
    res = [c.result(0.95, mu=mu) for c in zs]
    shift = shuffler_shift(members, steps, q, mu)
    assert shift < -5 and res[0]["shuffler_shift"] == pytest.approx(shift)
    assert all(r["flagged"] and r["p_value"] < 0.05 for r in res)
    assert np.mean([r["z"] for r in res]) == pytest.approx(shift, abs=0.3)
    assert res[0]["power_vs_shuffler"] > 0.999


def test_nothing_to_test_is_said():
    c = check(np.random.default_rng(2).standard_normal((3, 20)), 1.0)
    r = c.result(0.95, mu=1.0)
    assert not r["applicable"] and not r["flagged"] and "full batches" in r["reason"]
    c = check(np.random.default_rng(2).standard_normal((3, 5)), 0.5)
    r = c.result(0.95, mu=1.0)
    assert not r["applicable"] and "8 members" in r["reason"]


def test_fixed_batches_take_each_record_at_most_once_per_epoch():
    """Odd N at q = 1/2: batches of floor(N / 2), two per epoch, the odd record left out."""
    b = FixedBatches(101, 0.5, np.random.default_rng(0))
    for _ in range(3):
        first, second = b.sample(0), b.sample(1)
        assert len(first) == len(second) == 50
        assert not set(first.tolist()) & set(second.tolist())


@pytest.mark.parametrize("bug", ["none", "noise/4", "shuffle"])
def test_real_runs_only_the_shuffled_one_fails_the_sampling_check(bug, one_thread, tmp_path):
    """Through the real engine (the MLP with 32 records, one epoch of two steps at q = 1/2,
    claimed epsilon 4): the shuffler is flagged as not Poisson; a correct run and a noise bug
    are not (the check does not depend on the noise scale)."""
    r = run_one(bug, epsilon=4.0, q=0.5, steps=2, canaries=2000, seed=1)
    s = r["sampling"]
    assert s["applicable"] and s["members"] == r["members"] and s["groups"] == 2
    assert s["flagged"] is (bug == "shuffle")
    if bug == "shuffle":
        # the shift predicted for a shuffler is below -4; Z ~ N(shift, 1) lands below the
        # check's threshold (-2.81)
        assert s["shuffler_shift"] < -4 and r["privacy_bug_suspected"]
        assert s["z"] < stats.norm.ppf(1 - s["confidence"])
        assert not r["bound_rejects_claim"]  # the bound cannot see it; the check does
    else:
        assert s["z"] > stats.norm.ppf(1 - s["confidence"])
    assert s["confidence"] == pytest.approx(0.9975)  # a twentieth of the audit's 5%
    assert r["false_alarm_at_most"] == pytest.approx(0.0525)
    fa = r["false_alarm"]
    assert fa["per_test"] == pytest.approx({"ledger_bound": 0.05, "sampling_check": 0.0025})
    assert abs(s["control_z"]) < 3  # non-members: no sampler touches them
    level, words = whitebox_verdict(r)
    text = " ".join(words)
    assert "Sampling check" in text and f"Z = {s['z']:.2f}" in text
    assert (level == "bug") is r["privacy_bug_suspected"]
    assert ("not Poisson sampling" in text) is (bug == "shuffle")
    assert ("rejects the ledger's own trade-off curve" in text) is r["bound_rejects_claim"]
    assert words[1 if level == "ok" else sum(w.startswith("LIKELY") for w in words)].startswith(
        "False alarms: at 95% confidence a correct run is flagged with probability at most 5.25%"
    )  # next to the verdict
    write_whitebox(tmp_path, r)
    page = (tmp_path / "whitebox.html").read_text()
    assert "sampling check" in page and ("NOT POISSON" in page) is (bug == "shuffle")

"""White-box canary audit through the real engine: the canaries' gradients and scores, planted
bugs found and correct runs not flagged, refusals, and ``audit.whitebox`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from accountants import Budget
from attacks.bounds import ceilings
from attacks.planted import run_one
from attacks.whitebox import Canaries, whitebox_audit
from dptrain.engine import PrivacyEngine
from dptrain.policies import StaticPolicy, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/attacks/conftest.py


def engine(policy=None, *, q=1.0, grouping="per_layer", **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=policy or StaticPolicy(clip=2.0, noise_multiplier=1.5),
        sample_rate=q,
        dataset_size=100,
        grouping=grouping,
        **kw,
    )


def test_canaries_are_built_and_read_where_the_parameters_are():
    """Gradients are built on the parameters' device and dots gather there: on the CPU the
    numbers are bit for bit those of the CPU formulas (values in float64, then the dtype;
    dots of the whole update cast to float64 first); on another device (here: meta) nothing
    is mixed in from the CPU."""
    eng = engine()
    plan, _ = eng.next_plan()
    cs = Canaries.draw(eng.groups, plan.clip, 5, np.random.default_rng(1), support=3)
    which = torch.tensor([0, 2, 4])
    grads = cs.gradients(which)
    update = {p: torch.randn_like(p) for p in eng.params}
    dots = cs.dots(update)
    for g, ps in eng.groups.items():
        n = sum(p.numel() for p in ps)
        ref = torch.zeros(3, n, dtype=ps[0].dtype)
        ref.scatter_(1, cs.index[g][which], (cs.value[g][which] * 100 * plan.clip[g]).float())
        assert torch.equal(torch.cat([grads[p].flatten(1) for p in ps], 1), ref)
        flat = torch.cat([update[p].reshape(-1).double() for p in ps])
        assert np.array_equal(dots[g], (flat[cs.index[g]] * cs.value[g]).sum(1).numpy())
    meta = nn.Linear(8, 16, device="meta")
    on_meta = Canaries.draw({"w": list(meta.parameters())}, {"w": 1.0}, 4, np.random.default_rng(2))
    got = on_meta.gradients(torch.arange(4))
    assert all(t.device.type == "meta" and t.shape[0] == 4 for t in got.values())


def test_canaries_are_clipped_orthogonal_and_their_scores_are_unit_normal():
    eng = engine()
    plan, _ = eng.next_plan()
    m = 8  # fewer than every group's size: disjoint coordinates
    cs = Canaries.draw(eng.groups, plan.clip, m, np.random.default_rng(0), scale=10.0, support=4)
    grads = cs.gradients(torch.arange(m))
    flat = {
        g: torch.cat([grads[p].flatten(1) for p in ps], 1).double() for g, ps in eng.groups.items()
    }
    for g, f in flat.items():
        assert torch.allclose(f.norm(dim=1), torch.full((m,), 10 * plan.clip[g]).double())
        gram = f @ f.T
        assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros(m, m).double())
    # the clipped sum of canaries {0, 3}: their scores are mu = 1 / sigma, the others 0
    sums = {p: torch.zeros_like(p) for p in eng.params}
    for p in eng.params:
        g = eng.group_of[p]
        sums[p] = grads[p][[0, 3]].sum(0) / 10  # clipped to C_g: a tenth of the gradient
    z = cs.projections(sums, plan.noise_std, plan.noise_multiplier)
    want = np.zeros(m)
    want[[0, 3]] = 1 / plan.noise_multiplier
    np.testing.assert_allclose(z, want, atol=1e-6)
    # pure noise of the claimed std projects to N(0, 1) scores
    gen = torch.Generator().manual_seed(1)
    zs = np.stack(
        [
            cs.projections(
                {
                    p: torch.randn(p.shape, generator=gen) * plan.noise_std[eng.group_of[p]]
                    for p in eng.params
                },
                plan.noise_std,
                plan.noise_multiplier,
            )
            for _ in range(400)
        ]
    )
    assert abs(zs.mean()) < 0.05 and zs.std() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    "bug,flagged", [("none", False), ("noise/4", True), ("unclipped", True), ("noise/2", True)]
)
def test_planted_bugs_are_flagged_and_a_correct_run_is_not(bug, flagged):
    """Full-batch runs of the MLP through the real engine (32 records, 2 steps) claiming
    epsilon 4: the verdict rests on the f-DP test of the ledger's own curve."""
    canaries = 2000 if bug == "noise/2" else 1000
    r = run_one(bug, epsilon=4.0, q=1.0, steps=2, canaries=canaries, seed=3)
    assert r["privacy_bug_suspected"] is flagged
    led = r["bounds"]["ledger"]
    # the bound says the same: the claimed curve itself (grid point 0) is rejected or not
    assert (led["epsilon"] >= r["claimed_epsilon"]) is flagged and (led["j"] <= 0) is flagged
    assert r["claimed_epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert r["released_updates"] == 2 and r["mean_inclusions_per_member"] == 2.0
    for key in ("ledger", "fdp", "one_run"):
        assert 0 <= r["bounds"][key]["epsilon"] <= r["ceiling"][key] + 1e-9
    if not flagged:
        assert r["bounds"]["fdp"]["epsilon"] > 0.5  # the audit sees the canaries at all


def test_shuffled_batches_take_every_member_at_most_once_per_epoch():
    r = run_one("shuffle", epsilon=4.0, q=0.5, steps=4, canaries=400, seed=0)
    # 2 epochs of 2 batches of round(N / 2): at most once per epoch (an odd N drops one)
    assert 1.95 < r["mean_inclusions_per_member"] <= 2.0
    ok = run_one("none", epsilon=4.0, q=0.5, steps=4, canaries=400, seed=0)
    assert ok["mean_inclusions_per_member"] != 2.0  # Poisson: Binomial(4, 1/2) on average


def test_perfect_attacker_and_ratio_are_reported():
    eng = engine()
    r = whitebox_audit(
        eng, 2, canaries=300, delta=1e-5, rng=np.random.default_rng(2), simulations=8
    )
    p = r["perfect"]
    assert p["simulations"] == 8 and p["claim_rejected_share"] <= 0.25
    assert p["fdp"] > 0 and r["ratio_to_perfect"]["fdp"] == pytest.approx(
        r["bounds"]["fdp"]["epsilon"] / p["fdp"]
    )
    assert r["ceiling"]["fdp"] > p["fdp"]


def test_delta_bounds_are_tested_at_the_delta_the_guarantee_is_stated_at():
    """The claim is (epsilon, delta_total): the (eps, delta) bounds use delta_total, the
    claimed epsilon stays the accountant's at its delta."""
    r = whitebox_audit(engine(), 1, canaries=100, delta=1e-5, delta_total=1e-3, simulations=0)
    assert r["delta"] == 1e-5 and r["delta_total"] == 1e-3
    assert r["ceiling"]["fdp"] == pytest.approx(ceilings(100, 1e-3, 0.95)["fdp"])
    assert r["ceiling"]["fdp"] != pytest.approx(ceilings(100, 1e-5, 0.95)["fdp"])
    default = whitebox_audit(engine(), 1, canaries=100, delta=1e-5, simulations=0)
    assert default["delta_total"] >= 1e-5  # plus the noise sampler's truncation term
    with pytest.raises(ValueError, match="delta_total"):
        whitebox_audit(engine(), 1, canaries=100, delta=1e-5, delta_total=1e-6, simulations=0)


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="fresh engine without a budget"):
        whitebox_audit(engine(budget=Budget(8.0, 1e-5)), 1, canaries=100, delta=1e-5, simulations=0)
    ef = make_policy("error_feedback", clip=1.0, noise_multiplier=2.0, error_clip=0.1)
    with pytest.raises(ValueError, match="policy static"):
        whitebox_audit(engine(ef), 1, canaries=100, delta=1e-5, simulations=0)
    with pytest.raises(ValueError, match="no finite epsilon"):
        whitebox_audit(
            engine(StaticPolicy(clip=1.0, noise_multiplier=0.0)),
            1,
            canaries=100,
            delta=1e-5,
            simulations=0,
        )


def test_train_with_audit_whitebox_writes_the_report(tmp_path, capsys):
    """``dptrain train recipes/tiny.yaml`` with ``audit.whitebox: true``: the white-box audit
    of the run's own configuration runs after training and lands beside the run."""
    from dptrain.cli import main

    out = tmp_path / "tiny"
    sets = ["audit.whitebox=true", "audit.whitebox_canaries=300", "audit.whitebox_simulations=4"]
    args = ["train", "recipes/tiny.yaml", "--output", str(out), "--no-progress"]
    code = main([*args, *(x for s in sets for x in ("--set", s))])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "white-box audit" in stdout and "consistent with the ledger" in stdout
    assert (
        "False alarms: at 95% confidence a correct run is flagged with probability at most "
        "5.5% (5% for the f-DP test of the ledger's curve + 0.25% for the sampling check + "
        "0.25% for the noise check + 1e-07% for the key replay check;"
    ) in stdout
    w = json.loads((out / "audit" / "whitebox.json").read_text())
    meta = json.loads((out / "run.json").read_text())
    assert w["claimed_epsilon"] == pytest.approx(meta["epsilon"], rel=1e-6)
    assert w["steps"] == meta["steps"] and w["sample_rate"] == meta["sample_rate"]
    assert w["canaries"] == 300 and not w["privacy_bug_suspected"]
    # one group of more than 300 coordinates: the sampling check runs, and passes
    assert w["sampling"]["applicable"] and not w["sampling"]["flagged"]
    assert 0 <= w["bounds"]["ledger"]["epsilon"] < w["claimed_epsilon"]
    page = (out / "audit" / "whitebox.html").read_text()
    assert "White-box audit" in page and "class='box ok'" in page and "ceiling" in page
    assert "sampling check" in page
    assert math.isfinite(w["ceiling"]["fdp"])
    # canary-only: the noise check reads the coordinates no canary touches, and passes; two
    # new runs of the recipe get different keys
    noise = w["noise"]
    assert noise["applicable"] and not noise["flagged"] and noise["values_per_step"] == 2**16
    assert set(noise["tests"]) >= {"scale", "tail_2", "tail_3", "freshness"}
    assert w["key_replay"]["secure_keys"] and not w["key_replay"]["replayed"]
    assert "noise check" in page and "Key replay check: two new runs" in page
    check = w["engine_check"]  # the run's model against the per-example loop, and neighbours
    assert check["exact"] and not check["flagged"] and check["neighbour_tests"] > 0
    assert "Engine check (deterministic" in page


def test_engine_check_flags_a_planted_per_sample_bug_the_canaries_cannot_see(monkeypatch):
    """Canaries inject their gradients, so a wrong per-sample rule is invisible to them; the
    audit's engine check runs the run's own model against the per-example loop and flags it."""
    from attacks.report import whitebox_verdict
    from attacks.whitebox import engine_check
    from dptrain.grad_sample import ops
    from dptrain.grad_sample.outer import Outer
    from dptrain.recipe import load_recipe

    recipe = load_recipe("recipes/tiny.yaml", [], command="train")
    honest = engine_check(recipe, records=4, batch_size=2)
    assert honest["exact"] and not honest["flagged"] and honest["neighbour_tests"] >= 2
    assert honest["total_error"] < honest["tolerance"]

    rule = ops.AddMM.outer  # GPT-2's Conv1D layers

    def doubled_bias(self, use):
        out = rule(self, use)
        if "bias" in out:
            b = out["bias"]
            out["bias"] = Outer(2 * b.left, b.right, b.m, b.shape_)
        return out

    monkeypatch.setattr(ops.AddMM, "outer", doubled_bias)
    planted = engine_check(recipe, records=4, batch_size=2)
    assert planted["flagged"] and planted["total_error"] > 1e-3 and planted["worst_layer"]
    w = {  # the rest of a clean white-box result: only the engine check fires
        "bounds": {"ledger": {"epsilon": 0.0, "noise_factor": 1.0}, "fdp": {"epsilon": 0.0},
                   "one_run": {"epsilon": 0.0}},
        "ceiling": {"ledger": 1.0, "fdp": 1.0, "one_run": 1.0}, "confidence": 0.95,
        "claimed_epsilon": 8.0, "delta": 1e-5, "sample_rate": 0.01, "noise_multiplier": 1.0,
        "steps": 10, "groups": 1, "canaries": 100, "members": 50, "accountant": "rdp",
        "privacy_bug_suspected": True, "bound_rejects_claim": False, "engine_check": planted,
    }  # fmt: skip
    level, words = whitebox_verdict(w)
    assert level == "bug" and words[0].startswith(
        "LIKELY PRIVACY BUG (white-box audit): the engine's"
    )
    assert "per-example loop" in words[0] and "dptrain check" in words[0]
    assert sum(x.startswith("LIKELY PRIVACY BUG") for x in words) == 1

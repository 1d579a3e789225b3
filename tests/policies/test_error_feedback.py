"""The error_feedback (DiceSGD) policy: the recursion against an explicit per-example loop, its
worst case, non-finite samples, state and resume, recipe and API validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from accountants import ERROR_FEEDBACK, Ledger
from dptrain.losses import causal_lm_loss, classification_loss
from dptrain.policies import ErrorFeedbackPolicy, StaticPolicy, make_policy
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.rundir import RunDir
from dptrain.train import train
from tests._support import (
    assert_close_rel,
    lm_batch,
    loop_per_sample_grads,
    lora,
    make,
    seeded_noise,
    share_key,
    snapshot,
    tiny_gpt2,
)

ROOT = Path(__file__).resolve().parents[2]


def lora_gpt2():
    return lora(tiny_gpt2(), ["c_attn"])


def engine_for(model, policy, *, n, q=1.0, loss=causal_lm_loss, **kw):
    return make(model, policy=policy, n=n, q=q, loss=loss, **kw)


def clip_vec(parts: dict, c: float) -> dict:
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in parts.values()))
    scale = min(1.0, c / (norm + 1e-6))
    return {k: v * scale for k, v in parts.items()}


@pytest.mark.parametrize("c2", [0.02, 10.0])  # feedback clipped, and not
def test_noise_free_steps_follow_the_dicesgd_recursion(c2):
    """Three SGD(lr=1) steps against the recursion written out per example: clipped per-example
    gradients, E fed back clipped at C2, E += sum g - sum clip(g) - F, divided by E[B] = qN."""
    model = lora_gpt2()
    c1, q, n = 0.05, 0.5, 8
    engine = engine_for(model, ErrorFeedbackPolicy(c1, 0.0, error_clip=c2), n=n, q=q)
    names = {p: name for name, p in model.named_parameters() if p.requires_grad}
    error = {name: torch.zeros_like(p) for p, name in names.items()}
    for step in range(3):
        batch = lm_batch(61, 4, 6, seed=10 + step)
        per = {names[p]: g for p, g in loop_per_sample_grads(model, causal_lm_loss, batch).items()}
        norms = sum(g.flatten(1).pow(2).sum(1) for g in per.values()).sqrt()
        coef = (c1 / (norms + 1e-6)).clamp(max=1)
        clipped = {k: torch.einsum("b,b...->...", coef, g) for k, g in per.items()}
        raw = {k: g.sum(0) for k, g in per.items()}
        fed = clip_vec(error, c2)
        want = {k: (clipped[k] + fed[k]) / (q * n) for k in per}
        error = {k: error[k] + raw[k] - clipped[k] - fed[k] for k in per}
        before = snapshot(model)
        engine.step(batch)
        after = snapshot(model)
        for k in want:
            assert_close_rel(before[k] - after[k], want[k], rtol=1e-6, what=f"step {step} {k}")
    fed_norm = math.sqrt(sum(float(e.pow(2).sum()) for e in error.values()))
    assert (fed_norm > c2) == (c2 < 1)  # the first case really clips the feedback
    for k, e in engine.policy.error.items():
        assert_close_rel(e, error[k], rtol=1e-6, what=f"error {k}")


def test_error_clip_zero_is_the_static_policy_bit_for_bit():
    results = []
    for policy in (StaticPolicy(0.1, 1.0), ErrorFeedbackPolicy(0.1, 1.0, error_clip=0.0)):
        model = lora_gpt2()
        engine = engine_for(model, policy, n=40, q=0.1, noise=seeded_noise(3))
        for step in range(2):
            engine.step(lm_batch(61, 4, 6, seed=step))
        results.append(snapshot(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_worst_case_released_sums_differ_by_c1_plus_2c2():
    """The tightness example of accountants.error_feedback, run on the policy: records clipped
    along -u, plus a canary with a huge gradient along u.  After the first step, the released
    sums (q = 1, no noise) differ by exactly (C1 + 2 C2) u, so no bound can charge less."""
    c1, c2, d, n = 1.0, 0.3, 3, 5
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    rows = {
        "without": -5.0 * u.repeat(n, 1),
        "with": torch.cat([-5.0 * u.repeat(n, 1), 1e6 * u[None]]),
    }
    released = {}
    for label, x in rows.items():
        model = nn.Linear(d, 1, bias=False).double()
        nn.init.zeros_(model.weight)
        engine = engine_for(
            model,
            ErrorFeedbackPolicy(c1, 0.0, error_clip=c2),
            n=n,  # the same public normalization in both worlds
            loss=lambda m, b: m(b).squeeze(-1),  # per-sample gradient = its row of x
        )
        sums = []
        for _ in range(4):
            before = model.weight.detach().clone()
            engine.step(x)
            sums.append((before - model.weight.detach()).flatten() * n)
        released[label] = torch.stack(sums)
    diff = released["with"] - released["without"]
    assert torch.allclose(diff[0], c1 * u, atol=1e-6)
    assert torch.allclose(diff[1:], (c1 + 2 * c2) * u.expand(3, d), atol=1e-6)


def test_nonfinite_sample_does_not_poison_the_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64) * 10
    y = torch.tensor([0, 1, 0, 1])
    policy = ErrorFeedbackPolicy(0.1, 0.0, error_clip=0.05)
    engine = engine_for(model, policy, n=4, loss=classification_loss)
    engine.step((x, y))
    before = {k: e.clone() for k, e in policy.error.items()}
    fed = clip_vec(before, 0.05)
    x_bad = x.clone()
    x_bad[1, 0] = float("nan")
    report = engine.step((x_bad, y))
    assert report.nonfinite == 1
    for k, e in policy.error.items():  # no new residual on this step: E <- E - F
        assert torch.isfinite(e).all()
        assert_close_rel(e, before[k] - fed[k], rtol=1e-12, what=k)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fed_back_error_never_exceeds_c2_in_float32():
    """||F|| <= C2 exactly: an error buffer of norm 1024 (one exactly representable entry) fed
    back at C2 = 0.1; C2 / (1024 + 1e-6) rounded to nearest in float32 is above the quotient
    (float32(0.1) > 0.1 by 1.5e-8, relatively, against the 1e-6's 1e-9), so F would exceed
    C2; rounded toward zero it does not.  No data gradient (zero inputs), E[B] = 1, lr 1: the
    update is -F."""
    c2 = 0.1
    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)
    policy = ErrorFeedbackPolicy(0.5, 0.0, error_clip=c2)
    engine = engine_for(model, policy, n=1, loss=lambda m, b: m(b).squeeze(-1))
    e = torch.zeros(1, 4)
    e[0, 2] = 1024.0
    policy.error = {"weight": e}
    assert float(torch.tensor(c2 / (1024 + 1e-6), dtype=torch.float64).float()) * 1024 > c2
    engine.step(torch.zeros(1, 4))
    fed = float(model.weight.detach().double().norm())
    assert fed <= c2
    assert fed == pytest.approx(c2, rel=1e-7)


def test_error_state_is_keyed_by_name_and_checked_on_load():
    model = lora_gpt2()
    policy = ErrorFeedbackPolicy(0.05, 0.0, error_clip=0.01)
    engine = engine_for(model, policy, n=4)
    engine.step(lm_batch(61, 4, 6))
    state = engine.state_dict()["policy"]
    assert set(state["error"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = ErrorFeedbackPolicy(0.05, 0.0, error_clip=0.01)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()["error"][k], v) for k, v in state["error"].items())
    bad = {"error": {k: v[..., :1] for k, v in state["error"].items()}}
    other = ErrorFeedbackPolicy(0.05, 0.0, error_clip=0.01)
    other.load_state_dict(bad)
    with pytest.raises(ValueError, match="another model or LoRA"):
        engine_for(lora_gpt2(), other, n=4).step(lm_batch(61, 2, 6))


def test_events_calibration_and_accountant_checks():
    policy = make_policy("error_feedback", clip=2.0, noise_multiplier=None, error_clip=0.1)
    assert policy.feedback == pytest.approx(0.1)
    with pytest.raises(ValueError, match="accountant 'rdp'"):
        policy.calibrate(4.0, 1e-5, sample_rate=0.05, steps=100, accountant="prv")
    sigma = policy.calibrate(4.0, 1e-5, sample_rate=0.05, steps=100, accountant="rdp")
    static = StaticPolicy(2.0).calibrate(4.0, 1e-5, sample_rate=0.05, steps=100, accountant="rdp")
    assert sigma > static
    event = policy.planned_event(0.05)
    assert event.kind == ERROR_FEEDBACK and event.noise_multiplier == sigma
    from accountants import get_accountant

    assert get_accountant("rdp").epsilon([event.with_steps(100)], 1e-5) <= 4.0
    with pytest.raises(ValueError, match="accountant='rdp'"):
        engine_for(lora_gpt2(), policy, n=4, accountant="pld")
    with pytest.raises(ValueError, match="error_clip"):
        ErrorFeedbackPolicy(1.0, 1.0, error_clip=-1.0)


@pytest.mark.parametrize(
    ("clip", "group_clip", "refused"),
    [
        (1.0, {"a": 0.3, "b": 0.4}, True),  # names every group: C1 = 0.5, not clip
        (0.5, {"a": 0.3, "b": 0.4}, False),  # the fix: clip is that total
        (1.0, {"a": 0.6}, False),  # b shares the rest of clip: C1 = clip
    ],
)
def test_calibrate_before_bind_meets_the_target_or_is_refused(clip, group_clip, refused):
    """Static sigma does not depend on C1; DiceSGD's does (rho = 2 C2 / C1), so a calibration
    for the constructor's clip is refused at bind when group_clip makes C1 another value."""
    from accountants import get_accountant

    q, steps, eps, delta = 0.05, 50, 4.0, 1e-5
    rdp = get_accountant("rdp")
    for policy in (
        StaticPolicy(clip, group_clip=group_clip),
        ErrorFeedbackPolicy(clip, group_clip=group_clip, error_clip=0.05),
    ):
        policy.calibrate(eps, delta, sample_rate=q, steps=steps, accountant="rdp")
        if refused and isinstance(policy, ErrorFeedbackPolicy):
            with pytest.raises(ValueError, match=r"calibrate\(\).*Fix: construct .*clip=0\.5"):
                policy.bind(["a", "b"], sample_rate=q, expected_batch_size=10.0)
            continue
        policy.bind(["a", "b"], sample_rate=q, expected_batch_size=10.0)
        charged = policy.event(policy.plan(None)).with_steps(steps)
        assert rdp.epsilon([charged], delta) == pytest.approx(eps, rel=1e-3), policy.name


def test_a_noise_multiplier_set_by_hand_after_calibrate_is_bound_and_charged_at_its_rho():
    """calibrate() assumed C1 = clip; a sigma set by hand afterwards carries no such assumption:
    bind accepts it and each step is charged at that sigma and the bound rho = 2 C2 / C1 (the
    charge of a policy constructed with that C1 and sigma, the same epsilon)."""
    from accountants import error_feedback_event, get_accountant

    q, steps, delta, c2 = 0.05, 50, 1e-5, 0.05
    policy = ErrorFeedbackPolicy(1.0, group_clip={"a": 0.3, "b": 0.4}, error_clip=c2)
    sigma = policy.calibrate(4.0, delta, sample_rate=q, steps=steps, accountant="rdp")
    policy.noise_multiplier = 1.3 * sigma  # by hand: the calibration no longer applies
    policy.bind(["a", "b"], sample_rate=q, expected_batch_size=10.0)
    charged = policy.event(policy.plan(None))
    assert charged.noise_multiplier == pytest.approx(1.3 * sigma, rel=1e-12)
    assert charged.param("feedback_sensitivity") == pytest.approx(2 * c2 / 0.5)  # C1 = 0.5
    fresh = ErrorFeedbackPolicy(0.5, 1.3 * sigma, {"a": 0.3, "b": 0.4}, error_clip=c2)
    fresh.bind(["a", "b"], sample_rate=q, expected_batch_size=10.0)
    rdp = get_accountant("rdp")
    eps = rdp.epsilon([charged.with_steps(steps)], delta)
    assert eps == pytest.approx(
        rdp.epsilon([fresh.event(fresh.plan(None)).with_steps(steps)], delta)
    )
    # never the calibration's smaller rho: that would under-report
    low = error_feedback_event(q, 1.3 * sigma, 2 * c2 / 1.0, steps)
    assert eps > rdp.epsilon([low], delta)


def tiny_recipe(tmp_path: Path, name: str, **policy) -> dict:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / name)
    d["policy"] = {"name": "error_feedback", "clip": 1.0, "error_clip": 0.04, **policy}
    d["training"].update(steps=6, checkpoint_every=2)
    d["data"].update(max_records=160, max_validation_records=8)
    return d


def test_recipe_validation(tmp_path):
    d = tiny_recipe(tmp_path, "r")
    assert parse_recipe(d).policy.options == {"error_clip": 0.04}
    with pytest.raises(
        RecipeError,
        match=r"Fix: set privacy\.accountant: rdp",
    ):
        parse_recipe({**d, "privacy": {"accountant": "prv"}})
    for bad, match in [({"error_clip": -1}, "error_clip"), ({"error_clp": 1}, "error_clp")]:
        policy = {k: v for k, v in d["policy"].items() if k != "error_clip"} | bad
        with pytest.raises(RecipeError, match=match):
            parse_recipe({**d, "policy": policy})


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Stop after 4 steps, lose the step-4 checkpoint (as a kill before it was written would),
    resume from step 2: the run ends exactly where an uninterrupted one does, error state
    included."""
    # clip below the per-sample norms (~0.1-0.3 here), so that the error state is not zero
    opts = {"noise_multiplier": 1.0, "clip": 0.05, "error_clip": 0.002}
    cut = parse_recipe(tiny_recipe(tmp_path, "cut", **opts))
    train(cut, progress=False, max_steps_this_session=4)
    run = RunDir(tmp_path / "cut")
    assert [int(f.stem.split("-")[1]) for f in run.checkpoint_files()] == [2, 4]
    run.checkpoint_files()[-1].unlink()
    train(cut, tmp_path / "cut", resume=True, progress=False)
    share_key(tmp_path / "cut", tmp_path / "whole")  # the same secret coins and noise
    train(parse_recipe(tiny_recipe(tmp_path, "whole", **opts)), progress=False)

    a, b = RunDir(tmp_path / "cut"), RunDir(tmp_path / "whole")
    la, lb = Ledger.load(a.ledger), Ledger.load(b.ledger)
    assert la == lb and la.total_steps == 6 and la.events[0].kind == ERROR_FEEDBACK
    assert a.read_meta()["epsilon"] == b.read_meta()["epsilon"]
    sa = torch.load(a.checkpoint_files()[-1], weights_only=True)
    sb = torch.load(b.checkpoint_files()[-1], weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sb["model"])
    ea, eb = sa["engine"]["policy"]["error"], sb["engine"]["policy"]["error"]
    assert ea and all(torch.equal(ea[k], eb[k]) for k in eb)
    assert any(e.abs().sum() > 0 for e in eb.values())
    meta = b.read_meta()
    assert (
        meta["policy"]["name"] == "error_feedback" and meta["epsilon_by_accountant"]["prv"] is None
    )

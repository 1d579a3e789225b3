"""The private step against the explicit loop, virtual batches, sampling, noise and budget."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from accountants import Budget, BudgetExceeded, get_accountant
from dptrain.engine import PrivacyEngine
from dptrain.losses import causal_lm_loss, classification_loss
from dptrain.noise import GaussianNoise
from dptrain.policies import StaticPolicy
from dptrain.sampling import PoissonSampler
from dptrain.secret import RunKey
from tests._support import (
    assert_close_rel,
    lm_batch,
    loop_per_sample_grads,
    lora,
    make,
    seeded_noise,
    seeded_sampler,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)


def expected_step(model, batch, clip, groups_of):
    """Mean over the batch of per-example gradients clipped per group (the SGD lr=1 step)."""
    ref = loop_per_sample_grads(model, causal_lm_loss, batch)
    names = {p: n for n, p in model.named_parameters()}
    sq = {}
    for p, g in ref.items():
        k = groups_of(names[p])
        sq[k] = sq.get(k, 0) + g.flatten(1).pow(2).sum(1)
    out = {}
    for p, g in ref.items():
        k = groups_of(names[p])
        c = (clip[k] / (sq[k].sqrt() + 1e-6)).clamp(max=1)
        out[names[p]] = torch.einsum("b,b...->...", c, g) / g.shape[0]
    return out


@pytest.mark.parametrize(
    "build",
    [
        lambda: lora(tiny_gpt2(), ["c_attn"]),
        lambda: lora(tiny_llama(), ["q_proj", "v_proj"]),
        tiny_gpt2,
    ],
)
def test_noise_free_step_is_mean_of_clipped_per_example_grads(build):
    model = build()
    batch = lm_batch(61, 3, 6, seed=3)
    want = expected_step(model, batch, {"all": 0.1}, lambda n: "all")
    before = snapshot(model)
    engine = make(model, clip=0.1, n=3, q=1.0)
    engine.step(batch)
    after = snapshot(model)
    for name, delta in want.items():
        assert_close_rel(before[name] - after[name], delta, what=name)


def test_per_layer_clipping_matches_loop():
    from dptrain.groups import layer_of

    model = lora(tiny_llama(), ["q_proj", "v_proj"])
    batch = lm_batch(61, 4, 5, seed=4)
    engine = make(model, clip=0.2, n=4, q=1.0, grouping="per_layer")
    g = len(engine.groups)
    assert g == 4  # 2 layers x {q_proj, v_proj}, each LoRA module one group
    want = expected_step(model, batch, {k: 0.2 / math.sqrt(g) for k in engine.groups}, layer_of)
    before = snapshot(model)
    engine.step(batch)
    after = snapshot(model)
    for name, delta in want.items():
        assert_close_rel(before[name] - after[name], delta, what=name)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_virtual_batches_equal_one_pass(chunk):
    batch = lm_batch(61, 5, 6, seed=5)
    results = []
    for physical in (None, chunk):
        model = lora(tiny_gpt2(), ["c_attn", "c_proj"])
        engine = make(
            model,
            sigma=1.0,
            clip=0.1,
            n=50,
            q=0.1,
            max_physical_batch_size=physical,
            noise=seeded_noise(7),
        )
        engine.step(batch)
        results.append(snapshot(model))
    for name in results[0]:
        assert_close_rel(results[1][name], results[0][name], rtol=1e-9, what=name)


def test_empty_batch_takes_a_charged_noise_step():
    model = lora(tiny_gpt2(), ["c_attn"])
    engine = make(model, sigma=2.0, clip=0.5, n=100, q=0.01, noise=seeded_noise(0))
    before = snapshot(model)
    empty = {k: v[:0] for k, v in lm_batch(61, 1, 4).items()}
    report = engine.step(empty)
    after = snapshot(model)
    assert report.batch_size == 0 and engine.ledger.total_steps == 1
    moved = torch.cat([(before[n] - after[n]).flatten() for n in before])
    # pure noise of std sigma * C / E[B] per coordinate (SGD lr = 1)
    assert moved.abs().sum() > 0
    assert moved.std().item() == pytest.approx(2.0 * 0.5 / 1.0, rel=0.2)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_optimizers_and_determinism(opt):
    runs = []
    for _ in range(2):
        model = lora(tiny_llama(), ["q_proj"])
        engine = make(model, sigma=1.0, clip=1.0, n=20, q=0.25, opt=opt, noise=seeded_noise(3))
        sampler = seeded_sampler(20, 0.25, seed=11)
        data = lm_batch(61, 20, 6, seed=0)
        for t in range(3):
            idx = sampler.sample(t)
            engine.step({k: v[idx] for k, v in data.items()})
        runs.append(snapshot(model))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name])


def test_budget_refuses_before_the_step():
    model = lora(tiny_gpt2(), ["c_attn"])
    budget = Budget(epsilon=2.0, delta=1e-5)
    engine = make(model, sigma=1.5, clip=1.0, n=100, q=0.1, budget=budget)
    batch = lm_batch(61, 10, 5)
    fits = engine.remaining_steps()
    assert fits is not None and 0 < fits < 50
    for _ in range(fits):
        assert engine.next_step_fits() is True
        engine.step(batch)
    assert engine.epsilon() <= 2.0
    assert engine.next_step_fits() is False and engine.remaining_steps() == 0
    before = snapshot(model)
    with pytest.raises(BudgetExceeded, match="exceed the budget"):
        engine.step(batch)
    assert engine.ledger.total_steps == fits
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    acc = get_accountant("rdp")
    assert acc.epsilon(engine.ledger.events, 1e-5) <= 2.0


def test_poisson_sampler_statistics_and_errors():
    s = seeded_sampler(1000, 0.05, seed=1)
    sizes = [len(s.sample(t)) for t in range(200)]
    assert abs(sum(sizes) / 200 - 50) < 3
    assert len(set(sizes)) > 5  # variable batch size
    assert torch.equal(s.sample(7), seeded_sampler(1000, 0.05, seed=1).sample(7))  # stateless
    assert not torch.equal(s.sample(7), seeded_sampler(1000, 0.05, seed=2).sample(7))
    with pytest.raises(ValueError, match="same data"):
        seeded_sampler(999, 0.05, 1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="empty"):
        PoissonSampler([], 0.1)
    with pytest.raises(TypeError, match="ids"):
        PoissonSampler(1000, 0.1)  # a count would key coins by position
    with pytest.raises(ValueError, match="unique"):
        PoissonSampler(["a", "b", "a"], 0.1)


def test_default_noise_and_coins_are_fresh_per_instance():
    """Without a key, every noise source and sampler draws a fresh secret one."""
    x = torch.zeros(50_000)
    a, b = GaussianNoise(), GaussianNoise()
    a.begin_step(0), b.begin_step(0)
    za, zb = a(x, 2.0), b(x, 2.0)
    assert not torch.equal(za, zb)
    assert za.mean().abs() < 0.05 and za.std().item() == pytest.approx(2.0, rel=0.02)
    ids = [str(i) for i in range(2000)]
    assert not torch.equal(PoissonSampler(ids, 0.1).sample(0), PoissonSampler(ids, 0.1).sample(0))


def test_nonfinite_sample_is_dropped_not_poisoning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    y = torch.tensor([0, 1, 0, 1])
    engine = make(model, clip=1.0, n=4, q=1.0, loss=classification_loss)
    before = snapshot(model)
    report = engine.step((x, y))
    after = snapshot(model)
    assert report.nonfinite == 1
    assert all(torch.isfinite(after[n]).all() for n in after)
    # equals the step on the three finite samples, still divided by E[B] = 4
    model2 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model2.load_state_dict(
        {k: v for k, v in zip(model2.state_dict(), before.values(), strict=True)}
    )
    keep = torch.tensor([0, 2, 3])
    engine2 = make(model2, clip=1.0, n=4, q=1.0, loss=classification_loss)
    engine2.step((x[keep], y[keep]))
    for (n, a), b in zip(after.items(), snapshot(model2).values(), strict=True):
        assert_close_rel(a, b, rtol=1e-9, what=n)


def test_a_batch_without_a_finite_loss_reports_nan_not_zero():
    """A loss of 0.0 would read as a perfect fit; no finite loss means no mean."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.full((2, 3), float("nan"), dtype=torch.float64)
    engine = make(model, clip=1.0, n=4, q=0.5, loss=classification_loss)
    report = engine.step((x, torch.tensor([0, 1])))
    assert report.nonfinite == 2 and math.isnan(report.loss)
    x[0] = 1.0
    report = engine.step((x, torch.tensor([0, 1])))
    assert report.nonfinite == 1 and math.isfinite(report.loss) and report.loss > 0


def test_plain_module_classifier_learns():
    torch.manual_seed(0)
    n = 512
    x = torch.randn(n, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    params = list(model.parameters())
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(params, lr=0.5),
        policy=StaticPolicy(clip=1.0, noise_multiplier=1.0),
        sample_rate=64 / n,
        dataset_size=n,
        loss_fn=classification_loss,
        budget=Budget(8.0, 1e-4),
    )
    sampler = PoissonSampler([str(i) for i in range(n)], 64 / n)
    for t in range(60):
        idx = sampler.sample(t)
        engine.step((x[idx], y[idx]))
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85
    assert 0 < engine.epsilon() <= 8.0


def test_loss_fn_must_be_per_sample():
    model = nn.Linear(3, 2)
    engine = make(model, n=4, q=1.0, loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match="one loss per sample"):
        engine.step((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))


def test_optimizer_missing_params_is_an_error():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not in the optimizer"):
        PrivacyEngine(
            model,
            torch.optim.SGD([model.weight], lr=1),
            policy=StaticPolicy(noise_multiplier=1.0),
            sample_rate=0.1,
            dataset_size=10,
        )


@pytest.mark.parametrize("grouping", ["flat", "per_layer"])
def test_injected_samples_are_clipped_like_records_and_hooks_see_the_release(grouping):
    """A record's per-sample gradient injected through ``step(..., injected=...)`` moves the
    model exactly as the record itself does; the release hook sees the update the optimizer
    applies (SGD lr = 1), after the ledger has charged the step."""
    batch = lm_batch(61, 3, 6, seed=8)
    model = lora(tiny_llama(), ["q_proj", "v_proj"])
    grads = loop_per_sample_grads(model, causal_lm_loss, batch)
    by_name = {n: grads[p] for n, p in model.named_parameters() if p in grads}
    results, seen = [], []
    for mode in ("records", "injected"):
        model = lora(tiny_llama(), ["q_proj", "v_proj"])
        engine = make(
            model,
            sigma=0.5,
            clip=0.05,
            n=3,
            grouping=grouping,
            noise=GaussianNoise(RunKey.from_insecure_seed(3)),
        )
        engine.add_release_hook(
            lambda step, update, e=engine, mode=mode: seen.append(
                (mode, step, e.ledger.total_steps, {p: u.clone() for p, u in update.items()})
            )
        )
        before = snapshot(model)
        if mode == "records":
            report = engine.step(batch)
        else:
            third = {p: by_name[n][2:] for n, p in model.named_parameters() if n in by_name}
            report = engine.step({k: v[:2] for k, v in batch.items()}, injected=third)
        assert report.batch_size == 3
        after = snapshot(model)
        results.append({n: before[n] - after[n] for n in before})
        _, step, charged, update = seen[-1]
        assert step == 1 and charged == 1
        names = {p: n for n, p in model.named_parameters()}
        for p, u in update.items():
            assert_close_rel(u, results[-1][names[p]], rtol=1e-9, what=names[p])
    for name in results[0]:
        assert_close_rel(results[1][name], results[0][name], rtol=1e-7, what=name)


def test_sampler_state_for_other_data_is_a_user_error():
    """Resuming on other data: the sampler's checkpoint names the fix, as a user error."""
    from dptrain.errors import UserError

    sampler = seeded_sampler(10, 0.5, seed=0)
    sampler.load_state_dict(sampler.state_dict())
    with pytest.raises(UserError, match="resume with the same data and recipe"):
        sampler.load_state_dict({"n": 11, "sample_rate": 0.5})

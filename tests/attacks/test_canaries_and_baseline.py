"""Canaries in the recipe and the data, and the non-private baseline switch."""

from __future__ import annotations

import math
import stat

import pytest
import torch

from accountants import Budget, BudgetFilter, Event, Ledger, get_accountant
from dptrain import PrivacyEngine, StaticPolicy
from dptrain.data.canaries import make_canaries, read_manifest, write_manifest
from dptrain.data.splits import split_data
from dptrain.recipe import CanarySection, RecipeError, parse_recipe
from dptrain.secret import RunKey

KEY = RunKey.from_insecure_seed(0)


def recipe_dict(**sections):
    d = {
        "model": {"name": "tiny-gpt2"},
        "data": {"path": "bundled:clinic_notes", "max_records": 50},
        "training": {"steps": 2, "batch_size": 4},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


def test_canaries_come_from_the_key_and_are_included_as_the_audit_needs():
    cfg = CanarySection(secret_digits=4, repetitions={1: 400, 3: 5})
    a, b = make_canaries(cfg, KEY), make_canaries(cfg, RunKey.from_insecure_seed(0))
    assert a == b and make_canaries(cfg, RunKey.from_insecure_seed(1)) != a
    fresh = make_canaries(cfg, RunKey.generate())  # a secret key: nobody can regenerate these
    assert [c.secret for c in fresh] != [c.secret for c in a]
    digits = [int(d) for c in fresh + a for d in c.secret]
    assert all(abs(digits.count(d) - len(digits) / 10) < 90 for d in range(10))  # uniform
    single = [c for c in a if c.repetitions == 1]
    assert len(single) == 400 and 160 < sum(c.included for c in single) < 240  # ~ Bernoulli(1/2)
    assert all(c.included for c in a if c.repetitions == 3)
    assert len({c.name for c in a}) == len(a)
    assert all(len(c.secret) == 4 and c.secret.isdigit() for c in a)
    assert a[0].text(cfg.template) == f"The secret code of {a[0].name} is {a[0].secret}."


def test_under_a_person_unit_every_canary_person_has_a_coin(tmp_path):
    """A canary is one person under data.privacy_unit: each, repeated or not, is included
    with probability 1/2 by its coin of the run key (the same draws as record level), and the
    training data, the manifest and the audit agree on it."""
    cfg = CanarySection(secret_digits=4, repetitions={1: 100, 3: 100})
    rec, per = make_canaries(cfg, KEY), make_canaries(cfg, KEY, person_level=True)
    assert [(c.name, c.secret) for c in rec] == [(c.name, c.secret) for c in per]
    assert [c.included for c in rec if c.repetitions == 1] == [
        c.included for c in per if c.repetitions == 1
    ]
    triple = [c.included for c in per if c.repetitions == 3]
    assert 30 < sum(triple) < 70  # ~ Bernoulli(1/2), no longer always included
    assert per != make_canaries(cfg, RunKey.from_insecure_seed(1), person_level=True)
    lines = "".join(f'{{"id": "n{i}", "p": "u{i % 20}", "text": "note {i}"}}\n' for i in range(80))
    (tmp_path / "p.jsonl").write_text(lines)
    unit = {"path": str(tmp_path / "p.jsonl"), "privacy_unit": {"field": "p"}, "max_records": None}
    recipe = parse_recipe(recipe_dict(data={**unit, "canaries": {"repetitions": {1: 4, 3: 8}}}))
    train, _, _ = split_data(recipe, KEY)
    drawn = make_canaries(recipe.data.canaries, KEY, person_level=True)
    inserted = [rid for rid in train.ids if rid.startswith("canary-")]
    assert inserted == [rid for c in drawn if c.included for rid in c.record_ids()]
    assert any(not c.included for c in drawn if c.repetitions == 3)  # this key excludes some
    write_manifest(tmp_path, recipe.data.canaries, KEY, person_level=True)
    m = read_manifest(tmp_path)
    assert m.person_level and m.canaries == drawn


def test_split_data_inserts_each_repetition_as_a_record(tmp_path):
    recipe = parse_recipe(recipe_dict(data={"canaries": {"repetitions": {1: 10, 4: 2}}}))
    train, val, unused = split_data(recipe, KEY)
    canaries = make_canaries(recipe.data.canaries, KEY)
    records = sum(c.repetitions for c in canaries if c.included)
    assert len(train) == 50 + records
    assert train.ids[50:] == [rid for c in canaries if c.included for rid in c.record_ids()]
    assert not set(unused.ids) & set(train.ids) and not set(unused.ids) & set(val.ids)
    path = write_manifest(tmp_path, recipe.data.canaries, KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "SECRET" in path.read_text()
    assert read_manifest(tmp_path).canaries == canaries
    assert read_manifest(tmp_path / "nowhere") is None


@pytest.mark.parametrize(
    "canaries,match",
    [({"template": "no placeholder"}, "must contain {secret}"),
     ({"template": "{secret} of {who}"}, "must contain {secret}"),
     ({"repetitions": {0: 3}}, "must be >= 1"),
     ({"secret_digits": 0}, "greater than or equal to 1"),
     ({"secret_dgits": 3}, "Did you mean 'secret_digits'")],
)  # fmt: skip
def test_bad_canary_sections_name_the_key(canaries, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe_dict(data={"canaries": canaries}))


@pytest.mark.parametrize(
    "policy,privacy,match",
    [({"clip": math.inf, "noise_multiplier": 1.0}, {"epsilon": math.inf}, "unbounded"),
     ({"noise_multiplier": 0.0}, {"epsilon": 8.0}, "adds no noise"),
     ({}, {"epsilon": math.inf}, "cannot calibrate")],
)  # fmt: skip
def test_non_private_settings_must_be_explicit(policy, privacy, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe_dict(policy=policy, privacy=privacy))
    with pytest.raises(RecipeError, match="shadow"):
        parse_recipe(recipe_dict(audit={"shadows": 3}))
    ok = parse_recipe(
        recipe_dict(policy={"clip": math.inf, "noise_multiplier": 0}, privacy={"epsilon": math.inf})
    )
    assert (
        ok.fingerprint()
        == parse_recipe(
            recipe_dict(
                policy={"clip": math.inf, "noise_multiplier": 0},
                privacy={"epsilon": math.inf},
                audit={"members": 64},
            )
        ).fingerprint()
    )  # audit options never change the run


def test_no_clipping_no_noise_is_plain_sgd_and_the_ledger_says_epsilon_is_infinite():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3) * 50, torch.randint(0, 2, (6,))  # large gradients: no clipping
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(
        model,
        opt,
        policy=StaticPolicy(clip=math.inf, noise_multiplier=0.0),
        sample_rate=0.5,
        dataset_size=12,
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
        budget=Budget(math.inf, 1e-5),
    )
    engine.step((x, y))
    loss = torch.nn.functional.cross_entropy(ref(x), y, reduction="sum") / 6.0  # E[B] = 6
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - q.grad)
    assert engine.ledger.events == [Event(0.5, 0.0, 1)]
    assert math.isinf(engine.epsilon())
    with pytest.raises(ValueError, match="unbounded"):
        StaticPolicy(clip=math.inf, noise_multiplier=1.0).bind(
            ["all"], sample_rate=0.5, expected_batch_size=1
        )
    # a finite budget still refuses a noiseless step, before it is taken
    assert not BudgetFilter(Budget(8.0, 1e-5)).allows(Ledger(), Event(0.5, 0.0))
    assert BudgetFilter(Budget(math.inf, 1e-5)).allows(
        Ledger([Event(0.5, 0.0, 9)]), Event(0.5, 0.0)
    )
    assert math.isinf(get_accountant("prv").epsilon([Event(0.5, 0.0, 1)], 1e-5))

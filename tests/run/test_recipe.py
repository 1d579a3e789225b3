"""Recipe validation: errors name the key and the fix, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dptrain.recipe import RecipeError, check_against_data, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict:
    return yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")))
def test_bundled_recipes_parse(path):
    load_recipe(path)


def error_of(data: dict) -> str:
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    return str(err.value)


def test_unknown_key_names_it_and_suggests():
    d = base()
    d["training"]["batchsize"] = 3
    msg = error_of(d)
    assert "training.batchsize: unknown key" in msg and "Did you mean 'batch_size'" in msg


def test_unknown_section():
    d = base()
    d["trainig"] = {}
    assert "trainig: unknown key" in error_of(d)


def test_wrong_type_names_key():
    d = base()
    d["training"]["lr"] = "fast"
    assert "training.lr" in error_of(d)


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("training", "sample_rate", 1.5),
        ("policy", "noise_multiplier", -1.0),
        ("privacy", "delta", 2.0),
        ("policy", "clip", 0),
    ],
)
def test_impossible_values(section, key, value):
    d = base()
    if key == "sample_rate":
        d["training"].pop("batch_size")
    d[section][key] = value
    assert f"{section}.{key}" in error_of(d)


def test_exactly_one_of_steps_or_epochs():
    d = base()
    d["training"]["epochs"] = 1
    assert "exactly one of training.steps and training.epochs" in error_of(d)


def test_unknown_policy_and_option():
    d = base()
    d["policy"]["name"] = "statc"
    assert "Did you mean 'static'" in error_of(d)
    d = base()
    d["policy"]["temperature"] = 3
    assert "policy.temperature: unknown key" in error_of(d)


def test_delta_must_be_below_one_over_n():
    d = base()
    d["privacy"]["delta"] = 0.01
    recipe = parse_recipe(d)
    with pytest.raises(RecipeError, match=r"privacy.delta: 0.01 is not below 1/N"):
        check_against_data(recipe, 400)
    q, delta, steps = check_against_data(parse_recipe(base()), 400)
    assert q == 16 / 400 and delta == 1 / 4000 and steps == 8


def test_batch_larger_than_data_and_tiny_data():
    recipe = parse_recipe(base())
    with pytest.raises(RecipeError, match=r"training\.batch_size"):
        check_against_data(recipe, 10)
    with pytest.raises(RecipeError, match="needs a dataset"):
        check_against_data(recipe, 1)


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    recipe = load_recipe(path, ["training.steps=3", "policy.clip=0.5"])
    assert recipe.training.steps == 3 and recipe.policy.clip == 0.5
    with pytest.raises(RecipeError, match=r"section\.key=value"):
        load_recipe(path, ["nonsense"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    text = (ROOT / "recipes" / "tiny.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "privacy:\n  epsilon: 100.0\n")  # a second privacy section
    with pytest.raises(RecipeError, match=r"key 'privacy' is given twice \(lines \d+ and \d+\)"):
        load_recipe(twice)
    inline = tmp_path / "inline.yaml"
    inline.write_text(text.replace("clip: 1.0", "clip: 1.0\n  clip: 50.0"))
    with pytest.raises(RecipeError, match=r"'clip' is given twice.*Fix: merge them"):
        load_recipe(inline)
    flow = tmp_path / "flow.yaml"
    flow.write_text(text.replace("lora: null", "lora: {r: 2, r: 4}"))
    with pytest.raises(RecipeError, match="'r' is given twice"):
        load_recipe(flow)
    anchors = tmp_path / "anchors.yaml"  # merge keys may still override what they merge
    anchors.write_text(text.replace("lora: null", "x: &l {r: 2}\nlora: {<<: *l, r: 4}"))
    with pytest.raises(RecipeError, match="x: unknown key"):
        load_recipe(anchors)


def test_fingerprint_ignores_resumable_keys():
    a = parse_recipe(base())
    d = base()
    d["training"]["steps"] = 99
    b = parse_recipe(d)
    d["training"]["lr"] = 0.1
    c = parse_recipe(d)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_resume_blockers_list_only_the_keys_that_must_match():
    """What a refused resume prints: training.steps and the other resumable keys, output_dir,
    audit and generation may differ; training.lr may not."""
    from dptrain.recipe import resume_blockers

    old = parse_recipe(base()).model_dump(mode="json")
    d = base()
    d["training"].update(steps=99, log_every=3, device="cpu")
    d.update(output_dir="elsewhere", generation={"samples": 0})
    assert resume_blockers(old, parse_recipe(d).model_dump(mode="json")) == []
    d["training"]["lr"] = 0.1
    d["privacy"]["epsilon"] = 4.0
    new = parse_recipe(d)
    assert resume_blockers(old, new.model_dump(mode="json")) == [
        "privacy.epsilon: 8.0 -> 4.0",
        "training.lr: 0.003 -> 0.1",
    ]
    assert parse_recipe(base()).fingerprint() != new.fingerprint()


def test_adaptive_policy_needs_an_adaptive_valid_accountant_at_validation():
    """``policy: rl`` with ``accountant: prv`` is refused by parse_recipe alone: before the data
    is read or the model is built (the rule lives in the policy registry)."""
    d = base()
    d["policy"] = {"name": "rl"}
    d["data"]["public_fraction"] = 0.05
    for accountant in ("prv", "pld"):
        d["privacy"] = {"accountant": accountant}
        msg = error_of(d)
        assert "privacy.accountant: policy 'rl' chooses its noise" in msg
        assert f"'{accountant}' is not" in msg and "Fix: set privacy.accountant: rdp" in msg
    d["privacy"] = {"accountant": "rdp"}
    assert parse_recipe(d).policy.name == "rl"


def test_registry_traits_match_the_policies_it_builds():
    """What validation reads off the registry is what the built policy says of itself."""
    from dptrain.policies import POLICIES, make_policy

    options = {"error_feedback": {"error_clip": 0.1}, "rl": {}}
    for name, spec in POLICIES.items():
        policy = make_policy(name, clip=1.0, noise_multiplier=1.0, **options.get(name, {}))
        assert (spec.adaptive, spec.accountants, spec.needs_public_data) == (
            policy.adaptive,
            policy.accountants,
            policy.needs_public_data,
        ), name

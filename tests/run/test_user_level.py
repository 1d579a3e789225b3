"""User-level DP: recipe validation, the person sampler, person-level accounting against
dp-accounting, group privacy, and whole runs with the person as the unit."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import yaml

from accountants import Event, Ledger, get_accountant
from dptrain.cli import main
from dptrain.data import TextDataset, load_texts
from dptrain.data.loading import DataError
from dptrain.data.people import People, person_ids, read_people, unit_name
from dptrain.data.splits import split_data
from dptrain.errors import RecipeError
from dptrain.recipe import load_recipe, parse_recipe
from dptrain.rundir import RunDir
from dptrain.secret import RunKey, run_key
from dptrain.user_level import (
    PersonSampler,
    cap_records,
    group_privacy,
    person_epsilon,
    plan_unit,
    record_budget,
    resolve_unit,
)

ROOT = Path(__file__).resolve().parents[2]


def _people_file(tmp_path: Path, n: int = 120, drop: int | None = None) -> Path:
    """``n`` bundled records with a ``patient_id``: people with 1..9 records each."""
    ds = load_texts("bundled:clinic_notes")
    path = tmp_path / "people.jsonl"
    lines, person, left = [], 0, 1
    for i in range(n):
        row = {"id": ds.ids[i], "patient_id": f"p{person:03d}", "text": ds.texts[i]}
        if i == drop:
            del row["patient_id"]
        lines.append(json.dumps(row))
        left -= 1
        if left == 0:
            person, left = person + 1, 1 + (person * 7) % 9
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(tmp_path: Path, data: dict, name: str = "r", **sections) -> dict:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / name)
    d["data"].pop("max_records")
    d["data"].update(data)
    if data.get("privacy_unit") not in (None, "record"):
        # validation is drawn per person (~30 people here): at the tiny recipe's 0.05 no person
        # was held out in ~1 of 5 runs, which the run refuses; at 0.3, ~1 in 10^5
        d["data"].setdefault("validation_fraction", 0.3)
    for section, values in sections.items():
        d[section].update(values)
    return d


# -- recipe validation ----------------------------------------------------------------------


def test_a_record_count_cap_is_refused_under_a_person_unit(tmp_path):
    """data.max_records keeps records by count: an added person could swap records of other
    people out, so no person-level guarantee holds for the file; refused, naming the fix."""
    path = _people_file(tmp_path)
    unit = {"path": path.as_posix(), "privacy_unit": {"field": "patient_id"}}
    with pytest.raises(RecipeError, match=r"data.max_records with data.privacy_unit.*Fix"):
        parse_recipe(_recipe(tmp_path, {**unit, "max_records": 50}))
    assert parse_recipe(_recipe(tmp_path, unit)).data.max_records is None
    assert parse_recipe(_recipe(tmp_path, {"path": path.as_posix(), "max_records": 50}))


def test_recipe_validation(tmp_path):
    path = str(_people_file(tmp_path))
    ok = parse_recipe(_recipe(tmp_path, {"path": path, "privacy_unit": {"field": "patient_id"}}))
    assert ok.data.privacy_unit.strategy == "user"
    assert ok.data.privacy_unit.max_records_per_person is None
    assert parse_recipe(_recipe(tmp_path, {"path": path})).data.privacy_unit is None
    record = parse_recipe(_recipe(tmp_path, {"path": path, "privacy_unit": "record"}))
    assert record.data.privacy_unit is None
    bad = {
        "privacy_unit.field: required": {"privacy_unit": {}},
        "greater than or equal to 1": {
            "privacy_unit": {"field": "patient_id", "max_records_per_person": 0}
        },
        "mapping such as": {"privacy_unit": "patient_id"},
        "public_path": {"privacy_unit": {"field": "patient_id"}, "public_fraction": 0.1},
        "person_field is for record-level": {
            "privacy_unit": {"field": "patient_id"},
            "person_field": "patient_id",
        },
        "strategy": {"privacy_unit": {"field": "patient_id", "strategy": "shuffle"}},
    }
    for message, data in bad.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe(_recipe(tmp_path, {"path": path, **data}))
    unit = {"path": path, "privacy_unit": {"field": "patient_id"}}
    with pytest.raises(RecipeError, match="person-level audit"):
        parse_recipe({**_recipe(tmp_path, unit), "audit": {"after_training": True}})
    fed = yaml.safe_load((ROOT / "recipes" / "federated_tiny.yaml").read_text())
    fed["data"].update(unit)
    with pytest.raises(RecipeError, match="federated clients train with the record"):
        parse_recipe(fed)


def test_records_without_a_person_id_and_files_without_fields_are_refused(tmp_path):
    path = _people_file(tmp_path, drop=7)
    with pytest.raises(DataError, match=r"people.jsonl:8: the record has no 'patient_id'"):
        person_ids(str(path), "patient_id")
    txt = tmp_path / "a.txt"
    txt.write_text("one\ntwo\n")
    with pytest.raises(DataError, match="has no fields"):
        person_ids(str(txt), "patient_id")


def test_person_ids_from_csv_and_content_ids(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,user\nhello,u1\nworld,u2\nhello,u1\n")
    persons = person_ids(str(csv), "user")
    ds = load_texts(csv)
    people = read_people(ds, persons)
    assert people.ids == ["u1", "u2"] and people.counts.tolist() == [2, 1]
    assert unit_name("patient_id") == "patient" and unit_name("customerId") == "customer"
    assert unit_name("id") == "person"


def test_person_ids_from_every_format_the_loader_reads(tmp_path):
    """A JSON array, Parquet (file and folder) and a datasets save give the same people, keyed
    by the record ids load_texts gives; a missing person names its place in the file."""
    rows = [
        {"text": "alpha", "user": "u1"},
        {"text": "beta", "user": 2, "id": "b"},
        {"text": "  ", "user": None},  # dropped as empty: it needs no person
        {"text": "alpha", "user": "u1"},
    ]
    want = ["u1", "2", "u1"]
    paths = [tmp_path / "a.json"]
    paths[0].write_text(json.dumps(rows))
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {k: [None if r.get(k) is None else str(r[k]) for r in rows] for k in rows[1]}
    table = pa.table(columns)
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "parts" / "0.parquet")
    pq.write_table(table.slice(2), tmp_path / "parts" / "1.parquet")
    paths += [tmp_path / "a.parquet", tmp_path / "parts"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "saved"))
    paths.append(tmp_path / "saved")
    for path in paths:
        with pytest.warns(UserWarning, match="dropped 1 empty"):
            ds = load_texts(path)
        persons = person_ids(str(path), "user")  # silent: load_texts warned
        assert list(persons) == ds.ids and list(persons.values()) == want, path
    rows[3]["user"] = ""
    paths[0].write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"a.json: array element 4: the record has no 'user'"):
        person_ids(str(paths[0]), "user")
    pq.write_table(table.drop_columns(["user"]), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: row 1: the record has no 'user'"):
        person_ids(str(tmp_path / "a.parquet"), "user")


# -- the validation split --------------------------------------------------------------------


def _split(tmp_path: Path, data: dict, key: RunKey) -> tuple[TextDataset, TextDataset]:
    train, val, _ = split_data(parse_recipe(_recipe(tmp_path, data)), key)
    return train, val


def test_validation_split_holds_out_whole_people_by_the_run_key(tmp_path):
    path = _people_file(tmp_path, 200)
    persons = person_ids(str(path), "patient_id")
    data = {
        "path": str(path),
        "privacy_unit": {"field": "patient_id"},
        "validation_fraction": 0.25,
        "max_validation_records": None,
    }
    splits = [_split(tmp_path, data, RunKey(bytes([s]) * 32)) for s in (1, 2)]
    for train, val in splits:
        seen, held = {persons[r] for r in train.ids}, {persons[r] for r in val.ids}
        assert held and seen and not seen & held  # every person wholly on one side
        assert sorted(train.ids + val.ids) == sorted(persons)
        # all of a held-out person's records are held out
        assert len(val) == sum(1 for r in persons if persons[r] in held)
    assert set(splits[0][1].ids) != set(splits[1][1].ids)  # drawn from the key
    # one more person (3 records) changes the split by that person's records only
    lines = path.read_text().splitlines()
    extra = [json.dumps({"id": f"z{j}", "patient_id": "pz", "text": f"note {j}"}) for j in range(3)]
    (tmp_path / "more.jsonl").write_text("\n".join(lines + extra) + "\n")
    key = RunKey(bytes([1]) * 32)
    train2, val2 = _split(tmp_path, {**data, "path": str(tmp_path / "more.jsonl")}, key)
    z = {"z0", "z1", "z2"}
    assert (set(train2.ids) - z, set(val2.ids) - z) == (
        set(splits[0][0].ids),
        set(splits[0][1].ids),
    )
    assert z <= set(train2.ids) or z <= set(val2.ids)


def test_no_person_held_out_is_refused_in_words_for_people(tmp_path):
    """A person-level split that holds out nobody names people, not records, and both fixes."""
    from dptrain.train import prepare

    data = {
        "path": str(_people_file(tmp_path, 40)),
        "privacy_unit": {"field": "patient_id"},
        "validation_fraction": 1e-12,
    }
    with pytest.raises(RecipeError) as err:
        prepare(parse_recipe(_recipe(tmp_path, data)))
    msg = str(err.value)
    assert "no patient of" in msg and "split is per patient" in msg
    assert "each record" not in msg
    assert "raise data.validation_fraction" in msg and "data.validation_path" in msg
    with pytest.raises(RecipeError, match="each record is held out alone"):  # record level
        prepare(
            parse_recipe(_recipe(tmp_path, {"path": data["path"], "validation_fraction": 1e-12}))
        )


def test_record_level_split_bytes_are_unchanged(tmp_path):
    """The record-level split of the bundled corpus under a fixed key, digest taken before the
    person-level split existed: record-level recipes must keep the same train/validation/unused
    records in the same order."""
    d = _recipe(tmp_path, {"path": "bundled:clinic_notes"})
    d["data"]["max_validation_records"] = 32
    train, val, unused = split_data(parse_recipe(d), RunKey(bytes(range(32))))
    blob = "\n".join(["T", *train.ids, "V", *val.ids, "U", *unused.ids]).encode()
    assert (len(train), len(val), len(unused)) == (4270, 32, 198)
    digest = "2b0c717690b9045409a9eb51d37e62ffb3b4b4e50c5d61a21219a7947e5c563c"
    assert hashlib.sha256(blob).hexdigest() == digest


def test_validation_path_sharing_people_with_training_is_refused(tmp_path):
    path = _people_file(tmp_path, 60)
    rows = path.read_text().splitlines()
    (tmp_path / "tr.jsonl").write_text("\n".join(rows[:40]) + "\n")
    (tmp_path / "va.jsonl").write_text("\n".join(rows[38:]) + "\n")  # a person straddles
    data = {
        "path": str(tmp_path / "tr.jsonl"),
        "validation_path": str(tmp_path / "va.jsonl"),
        "privacy_unit": {"field": "patient_id"},
    }
    key = RunKey(bytes(32))
    with pytest.raises(RecipeError, match="have records in both the training and the validation"):
        _split(tmp_path, data, key)
    (tmp_path / "va.jsonl").write_text(json.dumps({"text": "no person"}) + "\n")
    with pytest.raises(RecipeError, match="cannot tell its records' people"):
        _split(tmp_path, data, key)
    persons = person_ids(str(path), "patient_id")
    cut = next(
        i
        for i in range(40, 60)
        if persons[json.loads(rows[i])["id"]] != persons[json.loads(rows[i - 1])["id"]]
    )
    (tmp_path / "va.jsonl").write_text("\n".join(rows[cut:]) + "\n")
    (tmp_path / "tr.jsonl").write_text("\n".join(rows[:cut]) + "\n")
    train, val = _split(tmp_path, data, key)
    assert len(train) == cut and len(val) == 60 - cut


# -- sampling ---------------------------------------------------------------------------------


def _people(n_people: int = 200, max_count: int = 12) -> tuple[People, list[str]]:
    persons, ids = [], []
    for p in range(n_people):
        for j in range(1 + (p * 5) % max_count):
            persons.append(f"u{p}")
            ids.append(f"u{p}-r{j}")
    return People.from_record_persons(persons), ids


def test_person_sampler_is_keyed_grouped_and_capped():
    people, ids = _people()
    key = RunKey.from_insecure_seed(3)
    s = PersonSampler(people, ids, 0.1, key, cap=3)
    idx, seg = s.sample(5)
    idx2, seg2 = PersonSampler(people, ids, 0.1, key, cap=3).sample(5)
    assert idx.tolist() == idx2.tolist() and seg.tolist() == seg2.tolist()  # (key, t) only
    other, _ = PersonSampler(people, ids, 0.1, RunKey.from_insecure_seed(4), cap=3).sample(5)
    assert other.tolist() != idx.tolist()  # another key, other people
    assert np.all(np.diff(seg.numpy()) >= 0)  # rows grouped by person
    owners = people.of_record[idx.numpy()]
    for k in np.unique(seg.numpy()):
        rows = owners[seg.numpy() == k]
        assert len(set(rows.tolist())) == 1 and 1 <= len(rows) <= 3
    # over many steps the rate over people is q (coins over people, not records)
    sizes = [len(np.unique(s.sample(t)[1].numpy())) for t in range(200)]
    assert abs(np.mean(sizes) / len(people) - 0.1) < 0.015
    # a heavy person's records rotate between steps (a fresh keyed choice each step)
    heavy = int(np.argmax(people.counts))
    seen = set()
    for t in range(300):
        idx, _ = s.sample(t)
        seen |= set(idx.tolist()) & set(people.members[heavy].tolist())
    assert len(seen) == people.counts[heavy] > 3


def test_adding_a_person_changes_nobody_elses_batch():
    people, ids = _people(50)
    key = RunKey.from_insecure_seed(1)
    more, more_ids = _people(51)
    a = PersonSampler(people, ids, 0.3, key, cap=2)
    b = PersonSampler(more, more_ids, 0.3, key, cap=2)
    for t in range(20):
        ra = {ids[i] for i in a.sample(t)[0].tolist()}
        rb = {more_ids[i] for i in b.sample(t)[0].tolist()}
        assert ra == {r for r in rb if not r.startswith("u50-")}


def test_cap_records_keeps_at_most_the_cap_per_person():
    people, ids = _people(30)
    ds = TextDataset(list(ids), list(ids))
    kept = cap_records(ds, people, 2, RunKey.from_insecure_seed(0))
    owners = [r.split("-")[0] for r in kept.ids]
    assert max(owners.count(o) for o in set(owners)) == 2 and len(set(owners)) == 30


# -- accounting ---------------------------------------------------------------------------------


def test_person_level_ledger_matches_dp_accounting(tmp_path):
    """A user-level plan: q over people; the ledger's epsilon equals dp-accounting's for the
    Poisson subsampled Gaussian with that q."""
    path = str(_people_file(tmp_path))
    recipe = parse_recipe(
        _recipe(
            tmp_path,
            {"path": path, "privacy_unit": {"field": "patient_id"}},
            training={"steps": 50, "batch_size": 2},
            policy={"noise_multiplier": 1.1},
        )
    )
    train = load_texts(path)
    unit, train = resolve_unit(recipe, train, RunKey.from_insecure_seed(0))
    plan = plan_unit(recipe, unit, len(train))
    n = len(unit.people)
    assert plan.dataset_size == n and plan.sample_rate == pytest.approx(2 / n)
    assert unit.person_delta == pytest.approx(1 / (10 * n))  # the default delta is over people
    ledger = Ledger()
    ledger.record(Event(plan.sample_rate, plan.policy.noise_multiplier, 50))
    ours = get_accountant("rdp").epsilon(ledger.events, unit.person_delta)
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(2 / n, dp_accounting.GaussianDpEvent(1.1))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, 50))
    assert ours == pytest.approx(acc.get_epsilon(unit.person_delta), rel=2e-2)
    # delta validated against the number of people, not of records
    for delta, fails in ((0.5 / n, False), (1.5 / n, True)):
        d = _recipe(tmp_path, {"path": path, "privacy_unit": {"field": "patient_id"}})
        d["privacy"]["delta"] = delta
        other = parse_recipe(d)
        unit_d, _ = resolve_unit(other, train, RunKey.from_insecure_seed(0))
        if fails:
            with pytest.raises(RecipeError, match=r"people\); such a delta allows publishing"):
                plan_unit(other, unit_d, len(train))
        else:
            assert delta > 1 / len(train)  # a record-level check would refuse it
            assert plan_unit(other, unit_d, len(train)).delta == delta


def test_group_privacy_and_the_example_strategy_budget(tmp_path):
    eps, delta = record_budget(8.0, 1e-5, 4)
    assert eps == 2.0
    assert group_privacy(eps, delta, 4) == pytest.approx((8.0, 1e-5))
    path = str(_people_file(tmp_path))
    recipe = parse_recipe(
        _recipe(
            tmp_path,
            {
                "path": path,
                "privacy_unit": {
                    "field": "patient_id",
                    "strategy": "example",
                    "max_records_per_person": 3,
                },
            },
        )
    )
    train = load_texts(path)
    unit, capped = resolve_unit(recipe, train, RunKey.from_insecure_seed(0))
    assert unit.group_size == 3 and unit.people.max_records <= 3 and len(capped) < len(train)
    plan = plan_unit(recipe, unit, len(capped))
    assert plan.budget.epsilon == pytest.approx(8.0 / 3) and plan.dataset_size == len(capped)
    guarantee = unit.guarantee(plan.budget.epsilon, plan.delta)
    assert guarantee["epsilon"] == pytest.approx(8.0)
    assert guarantee["delta"] == pytest.approx(unit.person_delta)
    assert "for each patient, over all of their records" in guarantee["statement"]


def test_the_example_strategy_without_a_cap_is_refused_at_validation(tmp_path):
    """Without max_records_per_person, k would be the training data's largest number of
    records of one person: a private statistic the noise is calibrated to and run.json
    publishes (group_size).  The recipe is refused, naming the fix."""
    path = str(_people_file(tmp_path))
    unit = {"field": "patient_id", "strategy": "example"}
    with pytest.raises(
        RecipeError,
        match=r"strategy example needs data\.privacy_unit\."
        r"max_records_per_person: a public cap.*or use strategy user",
    ):
        parse_recipe(_recipe(tmp_path, {"path": path, "privacy_unit": unit}))
    for fine in ({"strategy": "user"}, {"strategy": "example", "max_records_per_person": 9}):
        parse_recipe(_recipe(tmp_path, {"path": path, "privacy_unit": {**unit, **fine}}))


def test_the_example_strategy_caps_canary_people_like_others_and_k_shows_no_coin(tmp_path):
    """Canary ``i`` is a person whose repetitions are its records; under strategy example it
    is capped like any person (the run key keeps ``m`` of its copies), so ``k`` is the cap
    whatever the canaries' repetition counts, and its coin (every canary has one under a
    person unit) moves neither ``k`` nor the public record count."""
    from dptrain.data.canaries import left_out, make_canaries

    path = str(_people_file(tmp_path))
    unit = {"field": "patient_id", "strategy": "example", "max_records_per_person": 4}
    canaries = {"secret_digits": 2, "repetitions": {1: 2, 12: 1}}
    recipe = parse_recipe(
        _recipe(tmp_path, {"path": path, "privacy_unit": unit, "canaries": canaries})
    )
    sizes, coins, publics = set(), set(), set()
    for seed in range(2):  # key 0 includes the 12-record canary, key 1 does not
        key = RunKey.from_insecure_seed(seed)
        drawn = make_canaries(recipe.data.canaries, key, person_level=True)
        train, _, _ = split_data(recipe, key, canaries=drawn)
        included = any(rid.startswith("canary-00002-") for rid in train.ids)
        coins.add(included)
        withheld, withheld_people = left_out(drawn, 4)
        plan, capped = resolve_unit(recipe, train, key, withheld_people=withheld_people)
        assert plan.meta()["canaries"]["people"] == 3
        assert plan.meta()["canaries"]["unit"] == "patient"
        assert plan.people.max_records <= 4
        big = [rid for rid in capped.ids if rid.startswith("canary-00002-")]
        assert len(big) == (4 if included else 0)  # 4 of its 12 copies, by the run key
        sizes.add(plan.group_size)
        real = sum(not rid.startswith("canary-") for rid in capped.ids)
        publics.add(len(capped) + withheld - real)  # the canaries' share of the public count
    assert coins == {True, False}
    assert sizes == {4}
    assert publics == {1 + 1 + 4}  # every canary counted at its capped size, in or out


def test_a_constructed_uncapped_example_unit_is_refused_by_resolve_unit(tmp_path):
    """A recipe built past validation (model_copy) still cannot reach the uncapped path."""
    path = str(_people_file(tmp_path))
    unit = {"field": "patient_id", "strategy": "example", "max_records_per_person": 3}
    recipe = parse_recipe(_recipe(tmp_path, {"path": path, "privacy_unit": unit}))
    uncapped = recipe.data.privacy_unit.model_copy(update={"max_records_per_person": None})
    recipe = recipe.model_copy(
        update={"data": recipe.data.model_copy(update={"privacy_unit": uncapped})}
    )
    with pytest.raises(RecipeError, match="strategy example needs max_records_per_person"):
        resolve_unit(recipe, load_texts(path), RunKey.from_insecure_seed(0))


def test_person_epsilon_by_group_privacy_is_valid_and_grows_with_k():
    ledger = Ledger()
    ledger.record(Event(0.01, 1.0, 1000))
    acc = get_accountant("rdp")
    e1 = person_epsilon(ledger.events, acc, 1e-5, 1)
    assert e1 == pytest.approx(acc.epsilon(ledger.events, 1e-5))
    e4 = person_epsilon(ledger.events, acc, 1e-5, 4)
    assert e4 > 4 * e1 * 0.99  # no better than k times the record-level epsilon
    # it is a valid group-privacy statement: delta' sum e^(i eps') <= delta at eps' = e4 / 4
    from dptrain.user_level import group_delta_factor

    assert acc.delta(ledger.events, e4 / 4) * group_delta_factor(e4 / 4, 4) <= 1e-5 * (1 + 1e-9)
    assert math.isinf(person_epsilon(ledger.events, acc, 1e-5, 400))


# -- whole runs ---------------------------------------------------------------------------------


def _write(tmp_path: Path, d: dict, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_user_level_run_names_the_person_in_run_json_and_summary(tmp_path, capsys):
    data = {
        "path": str(_people_file(tmp_path, 160)),
        "privacy_unit": {"field": "patient_id", "max_records_per_person": 4},
    }
    d = _recipe(tmp_path, data, training={"steps": 3, "batch_size": 6})
    assert main(["train", _write(tmp_path, d, "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    meta = RunDir(tmp_path / "r").read_meta()
    unit = meta["privacy_unit"]
    assert unit["unit"] == "patient" and unit["strategy"] == "user"
    # N is the people; the record count (beside N: an added person's records) is private
    assert meta["dataset_size"] == unit["people"] and "records_per_person" not in unit
    stats = RunDir(tmp_path / "r").read_stats()
    assert unit["people"] < stats["records"] and stats["records_per_person"]["max"] <= 9
    assert f"{stats['records']} records (private" in out
    assert meta["sample_rate"] == pytest.approx(6 / unit["people"])
    assert meta["delta"] == pytest.approx(1 / (10 * unit["people"]))
    assert meta["person_level"]["epsilon"] == meta["epsilon"] <= 8.0
    assert "-DP for each patient, over all of their records" in out
    assert f"N = {unit['people']} people" in out


def test_record_level_run_shows_the_person_level_epsilon_beside(tmp_path, capsys):
    data = {"path": str(_people_file(tmp_path, 160)), "person_field": "patient_id"}
    d = _recipe(tmp_path, data, name="rec", training={"steps": 2, "batch_size": 6})
    assert main(["train", _write(tmp_path, d, "rec"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    meta = RunDir(tmp_path / "rec").read_meta()
    assert "person_level_group_privacy" not in meta  # its people and k are data statistics
    grouped = RunDir(tmp_path / "rec").read_stats()["person_level_group_privacy"]
    # k is the most training records of one patient: the keyed split may hold out some of the
    # 9 records of the largest patients, so recompute it from the run's own split
    run = RunDir(tmp_path / "rec")
    recipe = load_recipe(run.recipe)
    train = split_data(recipe, run_key(run.path, None, create=False))[0]
    persons = person_ids(data["path"], "patient_id")
    k = max(Counter(persons[rid] for rid in train.ids).values())
    assert 1 <= k <= 9 and grouped["group_size"] == k
    assert grouped["epsilon"] > k * meta["epsilon"] * 0.99
    assert "-DP for each training record" in out and "per patient" in out


@pytest.mark.parametrize("bad", ["missing", "null", "", "   "])
def test_a_record_without_a_person_is_refused_alike_in_every_format(tmp_path, bad):
    """Absent, null, empty or whitespace-only: the same refusal, naming the record's place,
    from JSONL, a JSON array, CSV, TSV, Parquet and a datasets save."""
    rows = [{"text": "alpha", "user": "u1"}, {"text": "beta", "user": "u2"}]
    value = {"missing": None, "null": None}.get(bad, bad)
    if bad != "missing":
        rows[1]["user"] = value
    else:
        del rows[1]["user"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for name, sep in (("a.csv", ","), ("a.tsv", "\t")):
        cells = [sep.join((r["text"], r.get("user") or "")) for r in rows]  # no null in CSV
        (tmp_path / name).write_text("\n".join([sep.join(("text", "user")), *cells]) + "\n")
    where = {
        "a.jsonl": "a.jsonl:2",
        "a.json": "a.json: array element 2",
        "a.csv": "a.csv:3",
        "a.tsv": "a.tsv:3",
    }
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {"text": [r["text"] for r in rows], "user": [r.get("user") for r in rows]}
    pq.write_table(pa.table(columns), tmp_path / "a.parquet")
    where["a.parquet"] = "a.parquet: row 2"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "saved"))
    where["saved"] = "saved: row 2"
    for name, place in where.items():
        with pytest.raises(DataError, match=rf"{place}: the record has no 'user'.*Fix: give"):
            person_ids(str(tmp_path / name), "user")


def test_one_person_written_as_a_number_or_text_is_one_person_in_every_format(tmp_path):
    """1, 1.0, "1", " 1 " and "1.0" are one person in JSONL, a JSON array, CSV, TSV, Parquet
    (an int64 part and a float64 part of one folder) and a datasets save: one canonical text."""
    values = [1, 1.0, "1", " 1 ", "1.0", 2, 2.0]
    rows = [{"text": f"note {i}", "user": v} for i, v in enumerate(values)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for name, sep in (("a.csv", ","), ("a.tsv", "\t")):
        cells = [sep.join((r["text"], str(r["user"]))) for r in rows]  # 1.0 is written "1.0"
        (tmp_path / name).write_text("\n".join([sep.join(("text", "user")), *cells]) + "\n")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "parts").mkdir()
    texts = [r["text"] for r in rows]
    pq.write_table(pa.table({"text": texts[:3], "user": [1, 2, 1]}), tmp_path / "parts/0.parquet")
    pq.write_table(  # float64: what an int column becomes in pandas after a null
        pa.table({"text": texts[3:], "user": [1.0, 1.0, 2.0, 2.0]}), tmp_path / "parts/1.parquet"
    )
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts, "user": [float(v) for v in values]}).save_to_disk(
        str(tmp_path / "saved")
    )
    for name in ("a.jsonl", "a.json", "a.csv", "a.tsv", "parts", "saved"):
        path = tmp_path / name
        people = read_people(load_texts(path), person_ids(str(path), "user"))
        want = [5, 2] if name != "parts" else [4, 3]
        assert people.ids == ["1", "2"] and people.counts.tolist() == want, name


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "is the float 1.5, which is not a whole number"),
        (2.0**60, "beyond 2\\^53"),
        (True, "is the boolean True"),
        ([1], "is list, not an id"),
        ("007", "'007' and .*a.jsonl:1: '7' are the same number written two ways"),
        ("+7", "the same number written two ways"),
    ],
)
def test_person_ids_without_one_exact_text_are_refused_naming_the_record(tmp_path, value, message):
    rows = [{"text": "alpha", "user": 7}, {"text": "beta", "user": value}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"a.jsonl:2: 'user' .*{message}.*Fix: "):
        person_ids(str(tmp_path / "a.jsonl"), "user")


def test_validation_path_sharing_a_person_written_another_way_is_refused(tmp_path):
    """Training JSONL person 7 and validation CSV person "7.0" / "007": one person."""
    (tmp_path / "tr.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}", "user": 7 + i}) + "\n" for i in range(3))
    )
    data = {
        "path": str(tmp_path / "tr.jsonl"),
        "validation_path": str(tmp_path / "va.csv"),
        "privacy_unit": {"field": "user"},
    }
    for written in ("7.0", "007", "11"):
        (tmp_path / "va.csv").write_text(f"text,user\nv1,{written}\nv2,12\n")
        if written == "11":
            train, val = _split(tmp_path, data, RunKey(bytes(32)))
            assert (len(train), len(val)) == (3, 2)
        else:
            with pytest.raises(RecipeError, match=r"people \(e\.g\. '7'\) have records in both"):
                _split(tmp_path, data, RunKey(bytes(32)))


@pytest.mark.parametrize("unit", [None, "user", "example"])
def test_public_sizes_count_every_canary_so_no_coin_shows(tmp_path, unit):
    """N (hence q, the default delta, run.json's sizes) counts the canaries their coins left
    out as well as those trained on: it follows the recipe's canary section, never a coin."""
    from dptrain.train import prepare

    data: dict = {"path": str(_people_file(tmp_path, 80))}
    if unit is not None:
        data["privacy_unit"] = {"field": "patient_id", "strategy": unit}
    if unit == "example":  # a cap below the 3-record canaries: they are capped like others
        data["privacy_unit"]["max_records_per_person"] = 2
    data["canaries"] = {"repetitions": {1: 6, 3: 4}}
    for seed in range(20):  # a key whose coins leave canaries out (half of them on average)
        recipe = parse_recipe(
            _recipe(tmp_path, data, name=f"r{seed}", privacy={"insecure_seed": seed})
        )
        prep = prepare(recipe)
        if any(not c.included for c in prep.canaries):
            break
    assert any(not c.included for c in prep.canaries)
    real = [rid for rid in prep.train_texts.ids if not rid.startswith("canary-")]
    records = len(real) + 6 * 1 + 4 * 3  # every configured canary record, in or out
    if unit == "user":
        people = len({p for p in prep.unit.people.ids if not p.startswith("canary-")})
        assert prep.unit.size == prep.plan.dataset_size == people + 10
        assert prep.unit.meta()["people"] == people + 10
    if unit is not None:  # the per-person statistics are the data's people's, not the canaries'
        real_counts = [
            len(m)
            for p, m in zip(prep.unit.people.ids, prep.unit.people.members, strict=True)
            if not p.startswith("canary-")
        ]
        assert "records_per_person" not in prep.unit.meta()  # private: private/stats.json
        stats = prep.unit.stats(len(real))["records_per_person"]
        assert stats["max"] == max(real_counts)
        assert stats["mean"] == pytest.approx(sum(real_counts) / len(real_counts))
    if unit == "example":  # q over records: every canary at its capped size, in or out
        assert prep.plan.dataset_size == len(real) + 6 * 1 + 4 * 2
    if unit is None:
        assert prep.plan.dataset_size == records
    assert prep.plan.sample_rate == pytest.approx(
        recipe.training.batch_size / prep.plan.dataset_size
    )


def _with_person(tmp_path: Path, line: int, person: str) -> Path:
    """``_people_file`` with record ``line``'s person renamed ``person``."""
    path = _people_file(tmp_path, 60)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[line]["patient_id"] = person
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("person", ["canary-00003", "canary-3"])
def test_a_real_person_with_a_canary_persons_id_is_refused_when_canaries_are_planted(
    tmp_path, person
):
    """Canary i is person ``canary-<i>``: a real person of that form would be bounded with
    canary 3's records (``canary-00003``) or counted as a canary (``canary-3``): refused,
    naming the record and the fix, under a person unit and for ``person_field`` alike (the
    latter before training, though its ids are used only at the end)."""
    from dptrain.train import prepare

    path = str(_with_person(tmp_path, 7, person))
    canaries = {"secret_digits": 2, "repetitions": {1: 4}}
    unit = {"field": "patient_id"}
    recipe = parse_recipe(
        _recipe(tmp_path, {"path": path, "privacy_unit": unit, "canaries": canaries})
    )
    where = rf"people.jsonl:8: 'patient_id' '{person}' has the form of an audit canary"
    with pytest.raises(DataError, match=rf"{where}.*Fix: rename that person"):
        split_data(recipe, RunKey(bytes(32)))
    record_level = {"person_field": "patient_id", "validation_fraction": 0.3}
    d = _recipe(tmp_path, {"path": path, **record_level, "canaries": canaries})
    with pytest.raises(DataError, match=where):
        prepare(parse_recipe({**d, "privacy": {"insecure_seed": 0, "epsilon": 8.0}}))


def test_without_canaries_a_canary_like_person_id_is_an_ordinary_person(tmp_path):
    """No canaries, no canary people: ``canary-00003`` is a person like any other, kept
    apart from everyone and counted in the statistics."""
    path = str(_with_person(tmp_path, 7, "canary-00003"))
    recipe = parse_recipe(
        _recipe(tmp_path, {"path": path, "privacy_unit": {"field": "patient_id"}})
    )
    key = RunKey(bytes(32))
    train, val, _ = split_data(recipe, key)
    plan, _ = resolve_unit(recipe, train, key)
    people = read_people(
        TextDataset(train.texts + val.texts, train.ids + val.ids), person_ids(path, "patient_id")
    )
    p = people.ids.index("canary-00003")
    assert len(people.members[p]) == 1  # record 7 alone: its old person kept the others
    assert plan.canary_people == 0 and "canaries" not in plan.meta()
    stats = plan.stats(len(train.texts))["records_per_person"]  # private/stats.json
    assert stats["max"] == plan.people.max_records  # all counted


def test_canary_record_ids_are_reserved_whatever_the_coins(tmp_path):
    """A data record may not take a canary's record id, whether or not that canary's coin
    included it (the refusal must not show a coin), and a structured record's id may not
    start with ``canary-`` (it would be read as a plain-text canary)."""
    from dptrain.data.canaries import Canary, insert_canaries
    from dptrain.recipe import CanarySection
    from dptrain.tasks.records import load_records
    from dptrain.tasks.schema import TaskSection

    left_out_canary = [Canary(0, "Bo Ka", "12", 1, included=False)]
    train = TextDataset(["a note"], ["canary-00000-0"])
    with pytest.raises(ValueError, match="'canary-00000-0' is already used"):
        insert_canaries(train, CanarySection(), RunKey(bytes(32)), left_out_canary)
    data = tmp_path / "instr.jsonl"
    data.write_text(json.dumps({"id": "canary-7", "prompt": "Hi?", "response": "Hello."}) + "\n")
    with pytest.raises(DataError, match=r"instr.jsonl:1: record id 'canary-7' .*reserved"):
        load_records(str(data), TaskSection(kind="instruction"))

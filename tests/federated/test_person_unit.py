"""A federated client's own privacy unit: the person (user-level DP-SGD on the client), set by
the data holder, fixed for the client's lifetime; the server's recipe cannot set it."""

from __future__ import annotations

import json

import pytest
from flwr.common.config import parse_config_args

from accountants import Ledger
from dptrain.data.loading import DataError
from dptrain.data.people import person_ids, read_people
from dptrain.federated import client as client_module
from dptrain.federated import simulate
from dptrain.federated.client import client_datasets
from dptrain.federated.holder import ClientConfig, ClientConfigError
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.rundir import RunDir

from .conftest import tiny_recipe


def test_privacy_unit_settings_round_trip_and_the_cap_needs_a_unit(tmp_path):
    own = ClientConfig(tmp_path / "c", 4.0, privacy_unit="patient_id", max_records_per_person=3)
    assert own.unit == "person:patient_id" and ClientConfig(tmp_path, 1.0).unit == "record"
    parsed = parse_config_args([own.node_config(0, 2)])
    assert ClientConfig.from_node_config(parsed) == own
    with pytest.raises(ClientConfigError, match="the cap is per person"):
        ClientConfig(tmp_path, 4.0, max_records_per_person=3)
    with pytest.raises(ClientConfigError, match="must name a field"):
        ClientConfig(tmp_path, 4.0, privacy_unit=" ")


def test_a_client_protects_its_people_and_keeps_its_unit(tmp_path, monkeypatch):
    d = tiny_recipe(tmp_path, federated={"rounds": 1, "min_clients": 1})
    recipe = parse_recipe(d)
    root = tmp_path / "clients"
    person = ClientConfig(
        root / "client-0", 8.0, privacy_unit="patient_id", max_records_per_person=4
    )
    sent: dict[int, dict] = {}  # the metrics each client sends the server
    reply = client_module._reply

    def spy(msg, metrics, **records):
        sent[int(metrics["client"])] = dict(metrics)
        return reply(msg, metrics, **records)

    monkeypatch.setattr(client_module, "_reply", spy)
    simulate(recipe, clients={0: person})
    (r1,) = RunDir(tmp_path / "run").read_metrics()
    entry = r1["clients"]["0"]
    mine = client_datasets(recipe)[0]
    people = read_people(mine, person_ids("bundled:clinic_notes", "patient_id"))
    assert len(people) < len(mine)  # the corpus has patients with several notes
    assert entry["status"] == "trained" and entry["people"] == len(people)
    assert entry["delta"] >= 1 / (10 * len(people))  # 1/(10 N_k) over people (+ truncation)
    assert "people" not in r1["clients"]["1"]  # the others keep the record
    # the FedAvg weight is N_k people: the record count would give a person's number of records
    assert sent[0]["num-examples"] == sent[0]["num-people"] == len(people)
    assert sent[1]["num-examples"] == len(client_datasets(recipe)[1])  # records: public N_k
    ledger = Ledger.load(root / "client-0" / "ledger.json")
    events, steps = ledger.events, ledger.total_steps
    assert events and all(e.sample_rate == pytest.approx(8 / len(people)) for e in events)
    assert json.loads((root / "client-0" / "unit.json").read_text()) == {
        "unit": "person:patient_id"
    }
    # the same client later declaring the record: its ledger is per person, so refused
    simulate(
        parse_recipe(tiny_recipe(tmp_path, "again", federated={"rounds": 1, "min_clients": 1})),
        clients={0: ClientConfig(root / "client-0", 8.0)},
    )
    (r2,) = RunDir(tmp_path / "again").read_metrics()
    again = r2["clients"]["0"]
    assert again["status"] == "declined" and "privacy unit 'person:patient_id'" in again["reason"]
    assert Ledger.load(root / "client-0" / "ledger.json").total_steps == steps == 3


def test_a_federated_recipe_refuses_what_its_clients_do_not_train(tmp_path):
    """Clients train plain text with the record (or their own person unit) and no canaries:
    another task kind, a server-side person unit (with a task or not) and audit canaries are
    refused in the recipe check, naming what works."""
    d = tiny_recipe(tmp_path)
    parse_recipe(d)  # text, the default task
    tasks = [
        {"kind": "instruction"},
        {"kind": "chat"},
        {"kind": "classification", "labels": ["a", "b"]},
    ]
    for task in tasks:
        with pytest.raises(
            RecipeError, match=r"dptrain train` only; a federated recipe trains on plain text"
        ):
            parse_recipe({**d, "task": task})
    unit = {**d["data"], "privacy_unit": {"field": "patient_id"}}
    with pytest.raises(RecipeError, match="set privacy-unit in each client's settings"):
        parse_recipe({**d, "data": unit})
    with pytest.raises(RecipeError, match="Fix: "):
        parse_recipe({**d, "data": unit, "task": {"kind": "instruction"}})
    with pytest.raises(
        RecipeError, match=r"data.canaries: a federated run plants no audit canaries"
    ):
        parse_recipe({**d, "data": {**d["data"], "canaries": {"repetitions": {1: 4}}}})


def test_a_client_reads_its_people_as_dptrain_train_does(tmp_path):
    """A client's own person unit is read by the reader of ``dptrain train`` (ids, canonical
    person ids and their refusals alike), from its own file or the recipe's."""
    from dptrain.data import load_texts
    from dptrain.data.people import recipe_person_ids
    from dptrain.federated.client import _client_people

    path = tmp_path / "mine.jsonl"
    rows = [{"text": f"note {i}", "who": [7, "7", 7.0, "p2"][i % 4]} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe(tiny_recipe(tmp_path))
    own = ClientConfig(tmp_path / "c", 8.0, privacy_unit="who", data_path=str(path))
    data = load_texts(str(path))
    people = _client_people(recipe, own, data)
    train_d = {k: v for k, v in tiny_recipe(tmp_path).items() if k != "federated"}
    train_d["data"] = {"path": str(path), "privacy_unit": {"field": "who"}, "max_length": 32}
    as_train = parse_recipe(train_d)  # a `dptrain train` recipe on the client's file
    expected = read_people(data, recipe_person_ids(as_train))
    assert people.ids == expected.ids == ["7", "p2"]
    assert [m.tolist() for m in people.members] == [m.tolist() for m in expected.members]
    rows[1]["who"] = "007"  # one number written two ways: refused for both alike
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="the same number written two ways"):
        _client_people(recipe, own, data)
    with pytest.raises(DataError, match="the same number written two ways"):
        recipe_person_ids(as_train)

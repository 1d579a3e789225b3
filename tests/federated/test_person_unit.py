"""A federated client's own privacy unit: the person (user-level DP-SGD on the client), set by
the data holder, fixed for the client's lifetime; the server's recipe cannot set it."""

from __future__ import annotations

import json

import pytest
from flwr.common.config import parse_config_args

from accountants import Ledger
from dptrain.data.people import person_ids, read_people
from dptrain.federated import client as client_module
from dptrain.federated import simulate
from dptrain.federated.client import client_datasets
from dptrain.federated.holder import ClientConfig, ClientConfigError
from dptrain.recipe import parse_recipe
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

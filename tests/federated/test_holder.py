"""The data holder owns its privacy: its own settings, refusals of weaker server requests, and
client state that no server run can reset."""

from __future__ import annotations

import shutil
import stat

import pytest

from accountants import Ledger
from dptrain.federated import simulate
from dptrain.federated.holder import (
    ClientConfig,
    ClientConfigError,
    Request,
    client_insecure_seed,
    refusal,
)
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.rundir import RunDir
from dptrain.secret import KEY_FILE, RunKey, RunKeyError

from .conftest import tiny_recipe

OWN = ClientConfig(state_dir="s", epsilon=4.0, delta=1e-5, min_noise_multiplier=0.8)


@pytest.mark.parametrize(
    "request_,reason",
    [(Request(4.0, 1e-5, "prv", 1.0), "asks for the prv accountant; this client accounts with rdp"),
     (Request(8.0, 1e-5, "rdp", 1.0), "asks for epsilon 8; this client's budget is epsilon 4"),
     (Request(4.0, 1e-4, "rdp", 1.0), "asks for delta 0.0001; this client's is 1e-05"),
     (Request(4.0, 1e-5, "rdp", 0.5), "noise multiplier 0.5 is below this client's minimum 0.8"),
     (Request(4.0, 1e-5, "rdp", None), "chosen during training is below this client's minimum"),
     (Request(4.0, 1e-5, "rdp", 0.8), None),
     (Request(1.0, 1e-6, "rdp", 3.0), None)],
)  # fmt: skip
def test_a_request_weaker_than_the_clients_own_settings_is_refused(request_, reason):
    got = refusal(request_, OWN, n=1000)
    assert got == reason if reason is None else reason in got


def test_default_delta_is_the_clients_own_one_over_ten_n():
    own = ClientConfig(state_dir="s", epsilon=8.0)
    assert refusal(Request(8.0, 1e-4, "rdp", 1.0), own, n=1000) is None
    assert "delta" in refusal(Request(8.0, 2e-4, "rdp", 1.0), own, n=1000)


def test_node_config_settings_errors_name_the_fix(tmp_path):
    with pytest.raises(ClientConfigError, match=r"no state-dir or epsilon of its own.*node-config"):
        ClientConfig.from_node_config({"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ClientConfigError, match=r"unknown client setting.*epsilno"):
        ClientConfig.from_node_config({"state-dir": "x", "epsilno": 3.0})
    with pytest.raises(ClientConfigError, match="accountant 'gdp'"):
        ClientConfig.from_node_config({"state-dir": "x", "epsilon": 3.0, "accountant": "gdp"})
    local = tmp_path / "me.yaml"
    local.write_text("state_dir: /data/me\nepsilon: 2.0\nmin_noise_multiplier: 1.5\n")
    own = ClientConfig.from_node_config(
        {"partition-id": 1, "client-config": str(local), "epsilon": 1.0}  # node config wins
    )
    assert own == ClientConfig("/data/me", 1.0, min_noise_multiplier=1.5)
    # the SuperNode string round-trips through Flower's parser
    from flwr.common.config import parse_config_args

    full = ClientConfig(tmp_path / "a b", 3.0, 1e-6, "prv", 0.5, "d.jsonl", 9)
    parsed = parse_config_args([full.node_config(1, 3)])
    assert parsed["partition-id"] == 1 and ClientConfig.from_node_config(parsed) == full


def test_refused_clients_say_why_train_nothing_and_keys_stay_with_each_client(tmp_path, capsys):
    d = tiny_recipe(tmp_path, federated={"rounds": 1, "min_clients": 1})
    recipe = parse_recipe(d)
    root = tmp_path / "clients"
    strict = {
        1: ClientConfig(root / "client-1", epsilon=4.0),  # the recipe asks for epsilon 8
        2: ClientConfig(root / "client-2", epsilon=8.0, min_noise_multiplier=50.0),
    }
    simulate(recipe, clients=strict)
    captured = capsys.readouterr()
    out = captured.out
    assert "client 1: delta not set: using 1/(10 N) = " in captured.err  # said, once
    assert captured.err.count("client 1: delta not set") == 1
    (r1,) = RunDir(tmp_path / "run").read_metrics()
    assert r1["clients"]["0"]["status"] == "trained"
    for k, why in ((1, "budget is epsilon 4"), (2, "below this client's minimum 50")):
        entry = r1["clients"][str(k)]
        assert entry["status"] == "declined" and why in entry["reason"] and entry["steps"] == 0
        assert f"client {k}: epsilon 0.0000, declined: refused:" in out  # logged by the server
        assert not (root / f"client-{k}" / "ledger.json").exists()
    # the client that trained holds its own key (0600); no client key is in the server's files
    path = root / "client-0" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = bytes.fromhex(path.read_bytes().split(b"\n")[1].decode())
    server_files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert (tmp_path / "run" / KEY_FILE) in server_files  # the server's own key
    assert RunKey.read(tmp_path / "run" / KEY_FILE).key_id != RunKey.read(path).key_id
    for f in server_files:
        assert raw not in f.read_bytes() and raw.hex().encode() not in f.read_bytes(), f


def test_client_state_must_be_chosen_and_outside_the_run_dir(tmp_path):
    d = tiny_recipe(tmp_path)
    del d["federated"]["state_dir"]
    with pytest.raises(RecipeError, match=r"federated\.state_dir: not set.*Fix"):
        simulate(parse_recipe(d))
    d["federated"]["state_dir"] = str(tmp_path / "run" / "clients")
    with pytest.raises(RecipeError, match="inside the run directory"):
        simulate(parse_recipe(d))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_new_server_run_continues_every_clients_ledger(tmp_path):
    """The first server run spends each client's budget (its noise is calibrated to it); a
    second server run with another output directory finds the same ledgers and is declined."""
    for name in ("first", "second"):
        simulate(parse_recipe(tiny_recipe(tmp_path, name, federated={"rounds": 1})))
    (first,), (second,) = (RunDir(tmp_path / n).read_metrics() for n in ("first", "second"))
    for k in range(3):
        ledger = Ledger.load(tmp_path / "clients" / f"client-{k}" / "ledger.json")
        assert ledger.total_steps == 3  # the second run charged nothing
        entry = second["clients"][str(k)]
        assert entry["status"] == "declined" and "would exceed epsilon=8" in entry["reason"]
        assert entry["epsilon"] == pytest.approx(first["clients"][str(k)]["epsilon"])
    seeds = {client_insecure_seed(5, k) for k in range(3)}
    assert len(seeds) == 3 and client_insecure_seed(None, 0) is None
    # a client whose ledger and engine state are gone, its key kept, would start over at step
    # 0 and repeat the noise it released: refused.  A server run dir left with its key alone
    # is refused likewise.
    state = tmp_path / "clients" / "client-0"
    for name in ("ledger.json", "engine.pt"):
        (state / name).unlink()
    simulate(parse_recipe(tiny_recipe(tmp_path, "third", federated={"rounds": 1})))
    (third,) = RunDir(tmp_path / "third").read_metrics()
    entry = third["clients"]["0"]
    assert entry["status"] == "declined" and "already drawn coins and noise" in entry["reason"]
    assert not (state / "ledger.json").exists()
    first = tmp_path / "first"
    for f in first.iterdir():
        if f.name != KEY_FILE:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    with pytest.raises(RunKeyError, match="holds no run any more"):
        simulate(parse_recipe(tiny_recipe(tmp_path, "first", federated={"rounds": 1})))


def test_a_failing_clients_error_text_stays_on_the_client(tmp_path, capsys):
    """An exception's message can quote private data (here the person id of one of the
    client's records); Flower would send it to the server as the failure's reason."""
    data = tmp_path / "own.jsonl"
    data.write_text(
        "".join(f'{{"patient": "p{i}", "text": "note {i}"}}\n' for i in range(20))
        + '{"patient": 4242.5, "text": "a note whose person id is a fraction"}\n'
    )
    d = tiny_recipe(tmp_path, federated={"rounds": 1, "min_clients": 1})
    root = tmp_path / "clients"
    own = {
        1: ClientConfig(root / "client-1", epsilon=8.0, data_path=str(data), privacy_unit="patient")
    }
    simulate(parse_recipe(d), clients=own)
    captured = capsys.readouterr()
    (r1,) = RunDir(tmp_path / "run").read_metrics()
    assert r1["clients"]["0"]["status"] == "trained" and "1" not in r1["clients"]
    (reason,) = r1["failures"].values()
    assert "its error stays on the client" in reason
    assert "4242" not in captured.out
    for f in (tmp_path / "run").rglob("*"):
        assert not f.is_file() or b"4242" not in f.read_bytes(), f
    assert "4242.5" in captured.err  # the client's own log says what went wrong


def test_a_set_up_with_two_nodes_on_one_partition_or_state_is_refused(tmp_path):
    """The run's client_guarantee counts one request per round per client: the simulation
    and the loopback deployment refuse settings that give two clients one state directory
    (or a partition-id the recipe does not have), before any run directory exists."""
    d = tiny_recipe(tmp_path)  # 3 clients
    recipe = parse_recipe(d)
    shared = ClientConfig(tmp_path / "clients" / "client-0", 8.0)  # client 0's default state
    with pytest.raises(ClientConfigError, match=r"clients 0 and 2 share the state-dir"):
        simulate(recipe, clients={2: shared})
    with pytest.raises(ClientConfigError, match=r"partition-id\(s\) \[3\].*3 clients \(0..2\)"):
        simulate(recipe, clients={3: ClientConfig(tmp_path / "elsewhere", 8.0)})
    assert not RunDir(tmp_path / "run").exists()
    from dptrain.federated.deploy import LoopbackFederation

    with pytest.raises(ClientConfigError, match=r"clients 0 and 1 share the state-dir"):
        LoopbackFederation(2, tmp_path / "flower", [shared, shared])

"""In-process Flower simulations of tiny models: the CLI end to end, client ledgers across
rounds and restarts, declining over budget, and faults (a crash mid-round, a client that
does not answer in time)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from accountants import Event, Ledger, get_accountant
from dptrain.cli import main
from dptrain.federated import client as client_module
from dptrain.federated import simulate
from dptrain.federated.client import CLIENT_FAILED
from dptrain.federated.lora import lora_state
from dptrain.federated.server import client_guarantee
from dptrain.federated.strategy import LoraFedAvg
from dptrain.models import build_model
from dptrain.publication import PUBLIC_RUN_FIELDS
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.rundir import RunDir

from .conftest import ROOT, tiny_recipe, write_recipe


def rdp_epsilon(ledger: Ledger, delta: float) -> float:
    return get_accountant("rdp").epsilon(ledger.events, delta)


def ledger_of(root, client: int) -> Ledger:
    """Client ``client``'s ledger in the clients' state root (never in a server run dir)."""
    return Ledger.load(root / f"client-{client}" / "ledger.json")


def test_cli_runs_a_simulation_and_writes_a_run_dir(tmp_path, capsys, monkeypatch):
    from dptrain.federated import server as server_module

    events: list[str] = []  # the server's ledger saves, round lines and metrics lines, in order
    save, log = Ledger.save, RunDir.log

    def saving(self, path):
        if path == tmp_path / "run" / "ledger.json":
            events.append(f"ledger {self.total_steps}")
        return save(self, path)

    def logging(self, record):
        events.append(f"log {record['round']}")
        return log(self, record)

    def printing(*args, **kwargs):
        if args and str(args[0]).startswith("round "):
            events.append(f"print {str(args[0]).split('/')[0].split()[1]}")
        return print(*args, **kwargs)

    monkeypatch.setattr(Ledger, "save", saving)
    monkeypatch.setattr(RunDir, "log", logging)
    monkeypatch.setattr(server_module, "print", printing, raising=False)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path))
    client_dp = "federated.client_dp={clip: 0.5, noise_multiplier: 2.0, delta: 0.01}"
    assert main(["federated", str(recipe), "--set", client_dp]) == 0
    out = capsys.readouterr().out
    # each round's ledger is on disk before the round is shown or logged
    assert events == ["ledger 1", "print 1", "log 1", "ledger 2", "print 2", "log 2"]
    assert "before training: global validation perplexity" in out
    # a server run has no record-level ledger, so no privacy figure to publish
    assert "publishable         recipe.yaml, run.json, ledger.json, final/; everything" in out
    for r in (1, 2):
        assert f"round {r}/2: global validation perplexity" in out
    # under client-level DP the console shows the client-level guarantee, and says why the
    # clients' own record-level epsilons are not shown (they are in private/stats.json)
    assert "client 2: trained (3 local steps)" in out and "client 2: epsilon" not in out
    assert "privacy per client" not in out and "client-level DP     (epsilon, delta) = (" in out
    assert "record-level        each client's own (epsilon, delta)" in out
    assert "client-level DP: epsilon" in out and "record-level epsilons not shown" in out

    run = RunDir(tmp_path / "run")
    meta = run.read_meta()
    assert meta["status"] == "finished" and meta["strategy"] == "fedsvd"
    stats = run.read_stats()  # validation perplexities are private: not in run.json
    assert not {"perplexity_before", "perplexity_after", "perplexity_by_round"} & set(meta)
    assert set(stats["perplexity_by_round"]) == {"0", "1", "2"}
    assert f"{stats['perplexity_before']:.3f} -> {stats['perplexity_after']:.3f} (private" in out
    assert run.metrics.parent == run.private and "private/" in run.readme.read_text()
    server_ledger = Ledger.load(run.ledger)  # client-level DP: one event per round
    assert server_ledger.events == [Event(1.0, 2.0, 2)]
    assert meta["client_dp_epsilon"] == pytest.approx(rdp_epsilon(server_ledger, 0.01))
    rounds = run.read_metrics()
    assert [m["round"] for m in rounds] == [1, 2] and all(m["aggregated"] for m in rounds)
    rdp = get_accountant("rdp")
    assert not (run.path / "clients").exists()  # client state is the clients', not the server's
    for k in range(3):
        ledger = ledger_of(tmp_path / "clients", k)
        assert ledger.total_steps == 2 * 3  # epsilon is over all rounds
        entry = rounds[-1]["clients"][str(k)]
        delta = 1 / (10 * entry_size(run, k))
        assert entry["epsilon"] == pytest.approx(rdp.epsilon(ledger.events, delta))
        # client-level DP protects a client's participation: its spend is not in run.json
        assert entry["epsilon"] <= 8.0 and stats["client_epsilon"][str(k)] == entry["epsilon"]
    assert "client_epsilon" not in meta and "train_seconds" not in meta
    # the global FedSVD adapter: A has orthonormal rows; the final adapter loads with peft
    state = torch.load(run.checkpoint_files()[-1], weights_only=True)["adapters"]
    for name, a in state.items():
        if ".lora_A." in name:
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    from peft import PeftModel

    from dptrain.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer("tiny-gpt2")
    model = PeftModel.from_pretrained(base, run.final)
    loaded = dict(model.named_parameters())
    for name, value in state.items():
        assert torch.equal(loaded[name].detach(), value), name


def entry_size(run: RunDir, k: int) -> int:
    """Client k's record count, as the recipe's split gives it."""
    recipe = parse_recipe(yaml.safe_load(run.recipe.read_text()))
    return len(client_module.client_datasets(recipe)[k])


def test_ledger_persists_across_rounds_and_restarts_and_rounds_over_budget_are_declined(tmp_path):
    # equal q and delta for every client; noise fixed: the budget fits exactly 9 local steps
    q, sigma, delta = 0.1, 1.0, 1e-4
    rdp = get_accountant("rdp")
    eps = [rdp.epsilon([Event(q, sigma, n)], delta) for n in (9, 10)]
    budget = (eps[0] + eps[1]) / 2
    states = tmp_path / "client-states"

    def recipe(name: str):
        d = tiny_recipe(
            tmp_path,
            name,
            training={"sample_rate": q, "batch_size": None},
            policy={"noise_multiplier": sigma},
            privacy={"epsilon": budget, "delta": delta},
            federated={
                "clients": 2,
                "min_clients": 1,
                "state_dir": str(states),
                "strategy": "ffa_lora",
            },
        )
        del d["training"]["batch_size"]
        return parse_recipe(d)

    saves = []
    save_engine = client_module.ClientState.save_engine

    def counting(self, state):
        saves.append(state)
        return save_engine(self, state)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(client_module.ClientState, "save_engine", counting)
        simulate(recipe("first"))  # rounds 1-2: 6 steps each
    assert len(saves) == 2 * 2  # once per client and round, not once per step
    pairs = sum(
        (p.numel() + 1) // 2
        for n, p in build_model(recipe("first"))[0].named_parameters()
        if ".lora_B." in n
    )  # FFA-LoRA trains B alone: one noise pair per 2 entries
    for k in range(2):
        assert Ledger.load(states / f"client-{k}" / "ledger.json").total_steps == 6
        state = torch.load(states / f"client-{k}" / "engine.pt", weights_only=True)
        assert state["engine"]["noise"]["pairs"] == 6 * pairs == 6 * state["pairs_per_step"]

    simulate(recipe("second"))  # a restart: round 1 fits (9 steps), round 2 does not
    second = RunDir(tmp_path / "second")
    r1, r2 = second.read_metrics()
    assert r1["aggregated"] and all(c["status"] == "trained" for c in r1["clients"].values())
    assert not r2["aggregated"] and "global adapters are kept" in r2["note"]
    for k in range(2):
        entry = r2["clients"][str(k)]
        assert entry["status"] == "declined"
        assert "would exceed epsilon" in entry["reason"] and "0 more fit" in entry["reason"]
        ledger = Ledger.load(states / f"client-{k}" / "ledger.json")
        assert ledger.total_steps == 9  # nothing charged for the declined round
        assert entry["epsilon"] == pytest.approx(eps[0]) and entry["epsilon"] <= budget
    # a declined round leaves the global model as it was
    before, after = (
        torch.load(p, weights_only=True)["adapters"] for p in second.checkpoint_files()
    )
    assert all(torch.equal(before[n], after[n]) for n in before)
    # FFA-LoRA: every A is still the model's random initialization; B has moved
    initial = lora_state(build_model(recipe("first"))[0])
    for name, value in after.items():
        assert torch.equal(value, initial[name]) == (".lora_A." in name), name


class _Faults(threading.local):
    crash_after: int | None = None


FAULTS = _Faults()


class CrashingEngine(client_module.PrivacyEngine):
    """A PrivacyEngine that dies after ``FAULTS.crash_after`` steps on this thread."""

    def step(self, batch):
        if FAULTS.crash_after is not None:
            if FAULTS.crash_after == 0:
                raise RuntimeError("simulated crash mid-round")
            FAULTS.crash_after -= 1
        return super().step(batch)


def test_crashed_and_silent_clients_do_not_stop_the_round_and_rejoin(tmp_path, monkeypatch):
    """The faults are events, not timings: the silent client holds its round-1 reply until the
    server has aggregated round 1 (whichever of Flower's clocks ended the wait: the grid's
    timeout or the requests' TTL), so only the healthy clients' training must fit in it."""
    timeout = 20.0  # ample for the healthy clients' tiny round on 2 busy cores
    monkeypatch.setattr(client_module, "PrivacyEngine", CrashingEngine)
    moved_on = threading.Event()  # the server has aggregated round 1
    aggregate = LoraFedAvg.aggregate_train

    def aggregating(self, server_round, replies):
        try:
            return aggregate(self, server_round, replies)
        finally:
            if server_round == 1:
                moved_on.set()

    monkeypatch.setattr(LoraFedAvg, "aggregate_train", aggregating)
    held: list[tuple[bool, int]] = []  # the silent client: (round 1 moved on, its round)

    def faults(msg, context, call_next):  # a Flower mod around the ClientApp
        client = int(context.node_config["partition-id"])
        first = int(msg.content["config"]["server-round"]) == 1
        FAULTS.crash_after = 2 if first and client == 1 else None
        if first and client == 2:
            moved = moved_on.wait(30 * timeout)  # answers only after the round moved on
            held.append((moved, int(msg.content["config"]["server-round"])))  # still round 1
        return call_next(msg, context)

    federated = {"clients": 4, "min_clients": 2, "round_timeout": timeout, "strategy": "dp_lora"}
    d = tiny_recipe(tmp_path, federated=federated)
    simulate(parse_recipe(d), mods=[faults])
    assert held == [(True, 1)]
    run = RunDir(tmp_path / "run")
    r1, r2 = run.read_metrics()
    assert r1["aggregated"] and r1["updates"] == 2  # clients 0 and 3: enough (min_clients 2)
    # the crash's own text stays on the client: the server gets the fixed reason, and the
    # spend of the whole planned round (3 steps), not of the 2 it charged before the crash:
    # where a round fails can depend on the private data, so it is not sent
    assert r1["failures"]["client 1"] == CLIENT_FAILED
    crashed = r1["clients"]["1"]
    assert crashed["status"] == "failed" and crashed["steps"] == 3
    ledger = ledger_of(tmp_path / "clients", 1)
    planned = Ledger([ledger.events[0].with_steps(3)])
    assert crashed["epsilon"] == pytest.approx(
        get_accountant("rdp").epsilon(planned.events, r2_delta(run, 1))
    )
    assert "no reply" in r1["failures"]["node " + node_of(r1)]
    assert r2["aggregated"] and r2["updates"] == 4  # both rejoin in round 2
    assert run.read_stats()["client_epsilon_unconfirmed"] == []  # round 2 reported every spend
    steps = {k: ledger_of(tmp_path / "clients", k).total_steps for k in range(4)}
    # the crashed client's ledger holds exactly the 2 steps it took, then round 2's 3;
    # the late client trained round 1 after the server moved on: charged all the same
    assert steps == {0: 6, 1: 2 + 3, 2: 3 + 3, 3: 6}
    assert r2["clients"]["1"]["epsilon"] == pytest.approx(
        get_accountant("rdp").epsilon(ledger_of(tmp_path / "clients", 1).events, r2_delta(run, 1))
    )


def node_of(r1: dict) -> str:
    """The node id of the silent client (failures before a client's first reply name nodes;
    the crashed one replied with its spend, naming itself)."""
    unnamed = [w.split()[1] for w in r1["failures"] if w.startswith("node ")]
    assert len(unnamed) == 1, r1["failures"]
    return unnamed[0]


def r2_delta(run: RunDir, k: int) -> float:
    return 1 / (10 * entry_size(run, k))


def test_run_json_says_nothing_of_which_clients_replied(tmp_path):
    """Two simulations that differ only in client 1 failing in round 1 (an out-of-memory
    error on a large Poisson batch, say: a function of its data) publish the same run.json,
    but for the environment, the key's id and the run's id; the clients' reported spends,
    which follow who replied when, differ in private/stats.json only."""

    def failing(msg, context, call_next):  # client 1 fails before it reads its ledger
        if int(context.node_config["partition-id"]) == 1:
            error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, CLIENT_FAILED)
            return Message(error, reply_to=msg)
        return call_next(msg, context)

    federated = {"clients": 2, "min_clients": 1, "rounds": 1}
    runs = []
    for name, mods in (("healthy", []), ("failed", [failing])):
        d = tiny_recipe(tmp_path, name, training={"steps": 1}, federated=federated)
        shutil.rmtree(d["federated"]["state_dir"], ignore_errors=True)  # fresh clients
        simulate(parse_recipe(d), mods=mods)
        runs.append(RunDir(tmp_path / name))
    (a, b), (sa, sb) = (r.read_meta() for r in runs), (r.read_stats() for r in runs)
    same = {k for k, why in PUBLIC_RUN_FIELDS.items() if why not in ("environment", "key", "nonce")}
    assert {k: v for k, v in a.items() if k in same} == {k: v for k, v in b.items() if k in same}
    assert not {"client_epsilon", "client_delta", "client_epsilon_unconfirmed"} & set(a)
    guarantee = a["client_guarantee"]  # the recipe's calibration for 1 round of 1 step
    assert guarantee["epsilon"] == 8.0 and guarantee["basis"] == "calibrated"
    assert guarantee["noise_pairs"] > 0 and 0 < guarantee["delta_noise_truncation"] < 1e-30
    assert set(sa["client_epsilon"]) == {"0", "1"} and sa["client_epsilon_unconfirmed"] == []
    assert set(sb["client_epsilon"]) == {"0"} and len(sb["client_epsilon_unconfirmed"]) == 1
    assert all(v <= guarantee["epsilon"] for v in sa["client_epsilon"].values())
    engine = torch.load(tmp_path / "clients" / "client-0" / "engine.pt", weights_only=True)
    assert engine["engine"]["noise"]["pairs"] == guarantee["noise_pairs"]  # 1 step: the bound


def test_client_guarantee_is_the_recipe_s_bound_or_none():
    """Fixed noise at a fixed sample rate and delta: the planned composition of all rounds'
    local steps; fixed noise at q = B / N_k: no bound from the recipe (the filters decide)."""
    fixed = {"policy": {"noise_multiplier": 1.0}, "privacy": {"delta": 1e-4}}
    d = tiny_recipe(Path("/tmp"), training={"sample_rate": 0.1}, **fixed)
    del d["training"]["batch_size"]
    g = client_guarantee(parse_recipe(d), pairs_per_step=10)
    rdp = get_accountant("rdp").epsilon([Event(0.1, 1.0, 2 * 3)], 1e-4)
    assert g["basis"] == "planned" and g["epsilon"] == pytest.approx(rdp)
    assert g["noise_pairs"] == 2 * 3 * 10 and g["delta"] == 1e-4
    g = client_guarantee(parse_recipe(tiny_recipe(Path("/tmp"), **fixed)), pairs_per_step=10)
    assert g["basis"] == "client filters" and g["epsilon"] is None and g["noise_pairs"] is None
    assert "caps its spend over its lifetime" in g["statement"]


def test_federated_recipe_errors_are_clear(tmp_path, capsys):
    d = tiny_recipe(tmp_path)
    d["federated"]["rouns"] = 3
    with pytest.raises(RecipeError, match=r"federated.rouns: unknown key.*Did you mean 'rounds'"):
        parse_recipe(d)
    d = tiny_recipe(tmp_path, federated={"min_clients": 5})
    with pytest.raises(RecipeError, match="min_clients"):
        parse_recipe(d)
    d = tiny_recipe(tmp_path, federated={"strategy": "fedsdv"})
    with pytest.raises(RecipeError, match=r"federated\.strategy"):
        parse_recipe(d)
    d = tiny_recipe(tmp_path)
    d["lora"] = None
    with pytest.raises(RecipeError, match="lora"):
        parse_recipe(d)
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    assert main(["train", str(path)]) == 2
    assert "dptrain federated" in capsys.readouterr().err
    assert main(["federated", str(ROOT / "recipes" / "tiny.yaml")]) == 2
    assert "dptrain train" in capsys.readouterr().err


def test_a_server_run_lists_ledger_json_as_public_only_when_it_has_one(tmp_path):
    """Without client_dp a server run writes no ledger.json: its summary must not list one."""
    from dptrain.federated.server import _public_files

    run = RunDir(tmp_path)
    assert _public_files(run) == ["recipe.yaml", "run.json", "final/"]
    run.ledger.write_text("{}")  # client-level DP: the server's ledger
    assert _public_files(run) == ["recipe.yaml", "run.json", "ledger.json", "final/"]

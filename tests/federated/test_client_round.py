"""One client round in process (no Flower runtime): the policy set up as ``dptrain train``
sets it up, and a round that fails after charging steps reports the client's spend."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from accountants import Event, Ledger, get_accountant
from dptrain.data import TextDataset, loading
from dptrain.federated import client as client_module
from dptrain.federated.client import CLIENT_FAILED, confined_train_round
from dptrain.federated.holder import ClientConfig
from dptrain.federated.lora import lora_state
from dptrain.federated.recipe import FederatedRecipe
from dptrain.federated.strategy import LoraFedAvg, RoundReport
from dptrain.models import build_model
from dptrain.plan import check_run, plan_privacy, policy_setup_refusal
from dptrain.policies import RunContext, policy_spec
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.secret import RunKey

from .conftest import tiny_recipe


def round_message(
    recipe: FederatedRecipe, node: int = 7, server_round: int = 1, run: str = "run-a"
) -> Message:
    arrays = ArrayRecord(lora_state(build_model(recipe)[0]))
    config = ConfigRecord({"server-round": server_round, "server-run": run})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def context(client: int = 0) -> Context:
    return Context(1, 7, {"partition-id": client}, RecordDict(), {})


def public_file(tmp_path):
    path = tmp_path / "public.jsonl"
    path.write_text("".join(f'{{"text": "a public note, number {i}"}}\n' for i in range(8)))
    return path


# one agent decision per round of 3 steps, one SAC update: the set-up is tested, not learning
RL = {"name": "rl", "rl": {"every": 3, "gradient_steps": 1, "batch_size": 4}}


def test_a_policy_that_cannot_be_set_up_is_refused_before_any_round_with_trains_error(
    tmp_path, task_identity
):
    rl = {"name": "rl"}
    with pytest.raises(RecipeError, match=r"policy 'rl' evaluates the model on public data"):
        parse_recipe(tiny_recipe(tmp_path, policy=rl))  # before the run dir or any round
    with pytest.raises(RecipeError, match=r"data.public_fraction: a federated recipe cannot"):
        parse_recipe(tiny_recipe(tmp_path, policy=rl, data={"public_fraction": 0.05}))
    # the same check as dptrain train's, with the fix a federated recipe can take
    d = tiny_recipe(tmp_path, policy=rl)
    del d["federated"]
    train = parse_recipe(d)
    with pytest.raises(RecipeError) as err:
        check_run(plan_privacy(train, 100), public_records=None, ledger=Ledger())
    fed = policy_setup_refusal(policy_spec("rl"), public_records=None, kind="federated")
    assert fed is not None and str(err.value).split(" Fix:")[0] == fed.split(" Fix:")[0]
    assert "data.public_path" in fed and "public_fraction (e.g." in str(err.value)
    # a Python caller's unchecked recipe: the client declines with that reason, before it
    # builds the model, draws from its key or writes its ledger
    ok = parse_recipe(tiny_recipe(tmp_path, policy=rl, data={"public_path": "x.jsonl"}))
    unchecked = ok.model_copy(update={"data": ok.data.model_copy(update={"public_path": None})})
    records = tmp_path / "own.jsonl"  # its own records: a simulation's share re-reads the recipe
    records.write_text("".join(f'{{"text": "note {i}"}}\n' for i in range(40)))
    own = ClientConfig(tmp_path / "client-0", 8.0, data_path=str(records), insecure_seed=1)
    reply = confined_train_round(round_message(ok), context(), unchecked, own)
    m = reply.content["metrics"]
    assert int(m["declined"]) == 1 and reply.content["status"]["reason"] == fed
    assert not (tmp_path / "client-0" / "ledger.json").exists()


def test_a_federated_client_attaches_the_rl_policy_and_reports_its_certified_epsilon(
    tmp_path, monkeypatch, task_identity
):
    path = public_file(tmp_path)
    d = tiny_recipe(tmp_path, policy=RL, data={"public_path": str(path)})
    recipe = parse_recipe(d)
    own = ClientConfig(tmp_path / "client-0", epsilon=8.0, insecure_seed=1)
    reads: list[str] = []  # the public file's reads, through the loader every task uses
    real = loading.load_texts

    def counted(p, *args, **kw):
        if str(p) == str(path):
            reads.append(str(p))
        return real(p, *args, **kw)

    monkeypatch.setattr(loading, "load_texts", counted)
    message = round_message(recipe)
    reply = confined_train_round(message, context(), recipe, own)
    assert not reply.has_error(), "the rl policy failed inside the round"
    m = reply.content["metrics"]
    assert int(m["declined"]) == 0 and int(m["steps"]) == 3
    # adaptive: the filter's budget is the guarantee (as dptrain train's), not the odometer
    assert float(m["epsilon"]) == 8.0
    assert Ledger.load(tmp_path / "client-0" / "ledger.json").total_steps == 3
    assert len(reads) == 1
    # the next round uses the records read once by this process (the same values)
    first = client_module._public_texts(recipe, TextDataset([], []), RunKey.from_insecure_seed(1))
    message = round_message(recipe, server_round=2)  # round 1 again would be declined
    reply = confined_train_round(message, context(), recipe, own)
    assert not reply.has_error() and int(reply.content["metrics"]["steps"]) == 3
    assert len(reads) == 1, "the second round read data.public_path again"
    assert Ledger.load(tmp_path / "client-0" / "ledger.json").total_steps == 6
    assert first == real(str(path))
    # a changed file (size or modification time) is read again
    path.write_text('{"text": "another public note"}\n')
    again = client_module._public_texts(recipe, TextDataset([], []), RunKey.from_insecure_seed(1))
    assert len(reads) == 2 and again is not None and again.texts == ["another public note"]


class FailsAfterCharging(client_module.PrivacyEngine):
    """Its third step is charged and applied, then the client fails before saving it."""

    def step(self, batch, **kwargs):
        report = super().step(batch, **kwargs)
        if self.steps_taken == 3:
            raise RuntimeError("simulated failure after the charge")
        return report


def test_a_round_that_fails_after_charging_reports_the_clients_whole_spend(
    tmp_path, monkeypatch, capsys, task_identity
):
    recipe = parse_recipe(tiny_recipe(tmp_path))
    own = ClientConfig(tmp_path / "client-0", epsilon=8.0, insecure_seed=1)
    monkeypatch.setattr(client_module, "PrivacyEngine", FailsAfterCharging)
    reply = confined_train_round(round_message(recipe), context(), recipe, own)
    ledger = Ledger.load(tmp_path / "client-0" / "ledger.json")
    assert ledger.total_steps == 3  # the failed step's charge is on disk too
    m = reply.content["metrics"]
    assert int(m["failed"]) == 1 and int(m["steps"]) == 3
    assert reply.content["status"]["reason"] == CLIENT_FAILED  # the error's text stays here
    assert "simulated failure" in capsys.readouterr().err
    spent = get_accountant("rdp").epsilon(ledger.events, own.own_delta(int(m["num-examples"])))
    assert float(m["epsilon"]) == pytest.approx(spent) and spent > 0
    # the server takes it as the client's spend, a failure, and its spend as confirmed
    strategy = LoraFedAvg(recipe)
    strategy.sent = [7]
    strategy.unconfirmed = {"node 7"}  # an earlier round's silence
    report = RoundReport(1)
    assert strategy._sort(report, [reply]) == []  # the reply of node 7's request
    assert strategy.epsilon[0] == pytest.approx(spent) and not strategy.unconfirmed
    assert report.failures == {"client 0": CLIENT_FAILED}
    assert report.clients[0]["status"] == "failed"
    # a request left unanswered: that client may have spent more than it last reported
    strategy.sent = [7]
    strategy._sort(RoundReport(2), [])
    assert strategy.unconfirmed == {"client 0"}


_ENGINE = client_module.PrivacyEngine  # before any test patches it


def _engine_failing_at(at: int) -> type:
    """The client's engine class, raising right after its step number ``at``."""

    class FailsAt(_ENGINE):
        def step(self, batch, **kwargs):
            report = super().step(batch, **kwargs)
            if self.steps_taken == at:
                raise RuntimeError(f"simulated failure at step {at}")
            return report

    return FailsAt


def test_a_failed_rounds_reply_does_not_depend_on_where_it_failed(
    tmp_path, monkeypatch, capsys, task_identity
):
    """The step at which a round fails can depend on the private data (an out-of-memory error
    on a large Poisson batch): the reply charges the whole planned round, at every point."""
    replies = []
    for at in (1, 3):
        FailsAt = _engine_failing_at(at)

        recipe = parse_recipe(tiny_recipe(tmp_path / str(at)))
        own = ClientConfig(tmp_path / str(at) / "client-0", epsilon=8.0, insecure_seed=1)
        monkeypatch.setattr(client_module, "PrivacyEngine", FailsAt)
        replies.append(confined_train_round(round_message(recipe), context(), recipe, own))
        assert Ledger.load(own.state_dir / "ledger.json").total_steps == at
    a, b = (r.content["metrics"] for r in replies)
    assert int(a["steps"]) == int(b["steps"]) == 3  # the planned local steps
    assert float(a["epsilon"]) == pytest.approx(float(b["epsilon"])) and float(a["epsilon"]) > 0
    capsys.readouterr()


def test_a_failed_rl_rounds_reply_does_not_depend_on_where_it_failed(
    tmp_path, monkeypatch, capsys, task_identity
):
    """As above with the rl policy, whose round ends with a count release (every = 3): the
    reply's delta (its truncation term over the planned round's noise pairs, the counts'
    included) is the same whether the round failed before or after that release."""
    replies = []
    for at in (1, 3):
        FailsAt = _engine_failing_at(at)

        (tmp_path / str(at)).mkdir()
        public = public_file(tmp_path / str(at))
        d = tiny_recipe(tmp_path / str(at), policy=RL, data={"public_path": str(public)})
        recipe = parse_recipe(d)
        # epsilon 60: the truncation term (1 + e^eps) pairs 2^-129 shows in the float delta
        own = ClientConfig(tmp_path / str(at) / "client-0", epsilon=60.0, insecure_seed=1)
        monkeypatch.setattr(client_module, "PrivacyEngine", FailsAt)
        replies.append(confined_train_round(round_message(recipe), context(), recipe, own))
        assert Ledger.load(own.state_dir / "ledger.json").total_steps == at
    a, b = (r.content["metrics"] for r in replies)
    assert int(a["failed"]) == int(b["failed"]) == 1
    assert int(a["steps"]) == int(b["steps"]) == 3
    assert float(a["epsilon"]) == float(b["epsilon"]) == 60.0  # adaptive: the filter's budget
    term = float(a["delta"]) - own.own_delta(int(a["num-examples"]))
    assert term > 1e-12  # the truncation term is in the reply ...
    assert float(a["delta"]) == float(b["delta"])  # ... and the same bit for bit
    capsys.readouterr()


def test_a_repeated_request_for_a_round_is_declined_and_a_new_server_runs_round_1_trains(
    tmp_path, task_identity
):
    """A redelivered request (or a second node sharing the state) trains at most once per
    (server run, round): the repeat is declined, charges nothing and draws nothing; round 1
    of another server run trains."""
    recipe = parse_recipe(tiny_recipe(tmp_path, training={"steps": 1}))
    own = ClientConfig(tmp_path / "client-0", epsilon=8.0, insecure_seed=1)
    ledger_path = own.state_dir / "ledger.json"
    first = confined_train_round(round_message(recipe), context(), recipe, own)
    assert int(first.content["metrics"]["declined"]) == 0
    after_first = Ledger.load(ledger_path)
    engine_state = (own.state_dir / "engine.pt").read_bytes()
    again = confined_train_round(round_message(recipe), context(), recipe, own)
    m = again.content["metrics"]
    assert int(m["declined"]) == 1 and int(m["steps"]) == 0 and "arrays" not in again.content
    reason = again.content["status"]["reason"]
    assert "already trained in round 1 of server run run-a" in reason
    assert float(m["epsilon"]) == pytest.approx(float(first.content["metrics"]["epsilon"]))
    assert Ledger.load(ledger_path).to_dict() == after_first.to_dict()  # nothing charged
    assert (own.state_dir / "engine.pt").read_bytes() == engine_state  # nothing drawn
    # the record outlives the process: a fresh state object reads it from rounds.json
    state = client_module.ClientState(own.state_dir)
    assert state.repeated_round("run-a", 1) is not None and state.repeated_round("run-a", 2) is None
    other = confined_train_round(round_message(recipe, run="run-b"), context(), recipe, own)
    assert int(other.content["metrics"]["declined"]) == 0
    assert Ledger.load(ledger_path).total_steps == 2 * after_first.total_steps


def test_a_rolled_back_ledger_or_a_lost_rounds_file_is_declined(tmp_path, task_identity):
    """The client's state must be the one its last round left: a ledger.json restored from an
    older copy (fewer steps than engine.pt recorded: the lacking steps' counters would draw
    their noise again) or a missing rounds.json (a round could train twice) is declined,
    charging and drawing nothing."""
    recipe = parse_recipe(tiny_recipe(tmp_path, training={"steps": 2}))
    own = ClientConfig(tmp_path / "client-0", epsilon=8.0, insecure_seed=1)
    ledger_path = own.state_dir / "ledger.json"
    rounds_path = own.state_dir / "rounds.json"
    older = None
    for rnd in (1, 2):
        if rnd == 2:
            older = ledger_path.read_text()  # the backup of round 1's ledger
        reply = confined_train_round(
            round_message(recipe, server_round=rnd), context(), recipe, own
        )
        assert int(reply.content["metrics"]["declined"]) == 0
    newest = ledger_path.read_text()
    engine_state = (own.state_dir / "engine.pt").read_bytes()
    ledger_path.write_text(older)  # restored from the older backup
    other_run = round_message(recipe, run="run-b")
    reply = confined_train_round(other_run, context(), recipe, own)
    m = reply.content["metrics"]
    assert int(m["declined"]) == 1 and "arrays" not in reply.content
    assert "the ledger was rolled back" in reply.content["status"]["reason"]
    assert (
        ledger_path.read_text() == older
        and (own.state_dir / "engine.pt").read_bytes() == engine_state
    )
    ledger_path.write_text(newest)
    rounds = rounds_path.read_text()
    rounds_path.unlink()
    reply = confined_train_round(other_run, context(), recipe, own)
    assert int(reply.content["metrics"]["declined"]) == 1
    assert "rounds.json is missing" in reply.content["status"]["reason"]
    assert ledger_path.read_text() == newest and not rounds_path.exists()
    rounds_path.write_text(rounds)  # both restored: the state checks pass, the budget decides
    reply = confined_train_round(other_run, context(), recipe, own)
    assert reply.content["status"]["reason"].startswith("budget: 2 more local steps")


def test_a_request_without_a_server_run_or_outside_the_rounds_is_declined(tmp_path, task_identity):
    recipe = parse_recipe(tiny_recipe(tmp_path))  # 2 rounds
    own = ClientConfig(tmp_path / "client-0", epsilon=8.0, insecure_seed=1)
    beyond = confined_train_round(round_message(recipe, server_round=3), context(), recipe, own)
    assert int(beyond.content["metrics"]["declined"]) == 1
    assert "not one of the recipe's rounds 1..2" in beyond.content["status"]["reason"]
    unnamed = round_message(recipe)
    del unnamed.content["config"]["server-run"]
    reply = confined_train_round(unnamed, context(), recipe, own)
    assert "names no server run" in reply.content["status"]["reason"]
    assert not (own.state_dir / "ledger.json").exists()


def test_a_clients_reply_says_whether_its_randomness_follows_from_an_insecure_seed(
    tmp_path, task_identity
):
    """A client's own insecure-seed voids the guarantee for its records: every reply says so,
    so that the server's report can (a declined request before any key is read suffices)."""
    recipe = parse_recipe(tiny_recipe(tmp_path))  # 2 rounds
    for seed, flag in ((1, 1), (None, 0)):
        own = ClientConfig(tmp_path / f"client-{seed}", epsilon=8.0, insecure_seed=seed)
        msg = round_message(recipe, server_round=3)
        reply = confined_train_round(msg, context(), recipe, own)
        assert int(reply.content["metrics"]["insecure-seed"]) == flag


def test_the_policy_plan_ends_with_this_server_runs_requests():
    """The policy's step counter is the client's lifetime one: at round r of R the plan
    ends T steps per round left after the steps already taken (RT in a first run)."""
    ledger = Ledger()
    assert client_module.plan_steps(ledger, 3, rounds=2, server_round=1) == 6
    ledger.record(Event(sample_rate=0.1, noise_multiplier=1.0, steps=6))  # an earlier run
    assert client_module.plan_steps(ledger, 3, rounds=2, server_round=1) == 12
    assert client_module.plan_steps(ledger, 3, rounds=2, server_round=2) == 9


def _paced_sigma(planned: int, ledger: Ledger, sigma_ref: float) -> float:
    """The rl policy's on-pace sigma (action 0) at the ledger's step, for a plan ending at
    lifetime step ``planned``."""
    from dptrain.policies.base import StepContext
    from dptrain.policies.rl import RLPolicy

    policy = RLPolicy(clip=1.0, noise_multiplier=sigma_ref, rl={"every": 3})
    policy.bind(["g"], sample_rate=0.1, expected_batch_size=4.0)
    policy.attach(RunContext(torch.nn.Linear(1, 1), planned, public_batches=[{}]))
    policy.driver = "env"  # no agent: the on-pace action
    policy.plan(StepContext(ledger.total_steps, 8.0, 1e-5, ledger))
    return policy._setting.sigma


def test_the_rl_pacer_paces_the_budgets_rest_over_this_server_runs_requests():
    """An earlier server run left 3 steps on the ledger (the client missed its round 2).
    Round 1 of a new 2-round run paces what is left over the 6 steps this run can still ask
    (a plan ending at 3 + 6): more noise than sigma_ref, and all 6 fit the budget.  The old
    plan (rounds x T = 6, ending before the lifetime counter's 3 + 6) paced it over 3 steps
    at about sigma_ref: the new run's round 2 would find nothing left."""
    q, delta, eps = 0.1, 1e-5, 8.0
    from dptrain.policies.rl import RLPolicy

    sigma_ref = RLPolicy(clip=1.0, rl={"every": 3}).calibrate(
        eps, delta, sample_rate=q, steps=6, accountant="rdp"
    )
    ledger = Ledger()
    ledger.record(Event(sample_rate=q, noise_multiplier=sigma_ref, steps=3))
    planned = client_module.plan_steps(ledger, 3, rounds=2, server_round=1)
    assert planned == 9
    paced = _paced_sigma(planned, ledger, sigma_ref)
    rdp = get_accountant("rdp")
    six = [*ledger.events, Event(sample_rate=q, noise_multiplier=paced, steps=6)]
    assert paced > sigma_ref and rdp.adaptive_epsilon(six, delta) <= eps
    old = _paced_sigma(6, ledger, sigma_ref)  # the old plan: this run's 6 steps as lifetime 6
    assert old < paced  # the rest of the budget over 3 steps: about sigma_ref
    too_many = [*ledger.events, Event(sample_rate=q, noise_multiplier=old, steps=6)]
    assert rdp.adaptive_epsilon(too_many, delta) > eps


def test_a_round_calibrated_for_another_n_k_than_its_runs_earlier_rounds_is_declined(
    tmp_path, task_identity
):
    """A client whose records change during a server run would compose steps calibrated for
    two N_k, beyond the run's client_guarantee ((8, 1e-5) with 1000 then 2000 records of 10
    rounds of 100 steps: 8.05 under rdp): the later round is declined and charges nothing;
    the next server run trains with the new calibration."""
    data = tmp_path / "own.jsonl"

    def write(n: int) -> None:
        data.write_text("".join(f'{{"text": "note {i} of this client"}}\n' for i in range(n)))

    write(40)
    recipe = parse_recipe(tiny_recipe(tmp_path, training={"steps": 1}, privacy={"delta": 1e-3}))
    own = ClientConfig(tmp_path / "client-0", epsilon=8.0, insecure_seed=1, data_path=str(data))
    first = confined_train_round(round_message(recipe), context(), recipe, own)
    assert int(first.content["metrics"]["declined"]) == 0
    ledger_path = own.state_dir / "ledger.json"
    after_first = Ledger.load(ledger_path).to_dict()
    same = client_module.ClientState(own.state_dir)
    write(80)  # N_k doubles: q_k halves, the calibrated sigma changes
    second = confined_train_round(round_message(recipe, server_round=2), context(), recipe, own)
    m = second.content["metrics"]
    assert int(m["declined"]) == 1 and "arrays" not in second.content
    assert "differ from those of this client's earlier rounds" in second.content["status"]["reason"]
    assert Ledger.load(ledger_path).to_dict() == after_first  # nothing charged
    assert same.repeated_round("run-a", 2) is None  # the declined round is not recorded
    other = confined_train_round(round_message(recipe, run="run-b"), context(), recipe, own)
    assert int(other.content["metrics"]["declined"]) == 0
    write(40)  # back to the first calibration: run-a's constants again
    third = confined_train_round(round_message(recipe, server_round=2), context(), recipe, own)
    assert int(third.content["metrics"]["declined"]) == 0


def test_a_person_units_segments_follow_its_current_file_after_the_file_changes(
    tmp_path, monkeypatch, task_identity
):
    """A client process tokenizes its records once, but its people index the records as its
    file holds them now: after the data holder reorders its file (same records, same people),
    every segment of a step must still hold one person's records only (rows of the stale
    tokenization at the new indices would put one person's records in several segments, each
    clipped at C: a sensitivity beyond C)."""
    import json

    path = tmp_path / "mine.jsonl"
    rows = [{"text": f"note {i} written for person {i % 3}", "who": f"p{i % 3}"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe(
        tiny_recipe(tmp_path, training={"steps": 2, "batch_size": 2}, privacy={"delta": 1e-3})
    )
    own = ClientConfig(
        tmp_path / "client-0", 8.0, insecure_seed=1, privacy_unit="who", data_path=str(path)
    )
    first = confined_train_round(round_message(recipe), context(), recipe, own)
    assert int(first.content["metrics"]["declined"]) == 0
    moved = [rows[1], rows[0], *rows[2:]]  # two records of two people change places
    path.write_text("".join(json.dumps(r) + "\n" for r in moved))
    tokenizer = build_model(recipe)[1]
    from dptrain.data import tokenize

    ex = tokenize(
        TextDataset([r["text"] for r in rows], [str(i) for i in range(12)]), tokenizer, 32
    )
    person_of = {
        tuple(ids[mask.bool()].tolist()): r["who"]
        for ids, mask, r in zip(ex.input_ids, ex.attention_mask, rows, strict=True)
    }
    assert len(person_of) == len(rows)
    seen: list[list[set[str]]] = []

    class Recording(_ENGINE):
        def step(self, batch, **kwargs):
            segments = kwargs["segments"]
            by_segment: dict[int, set[str]] = {}
            for ids, mask, seg in zip(
                batch["input_ids"], batch["attention_mask"], segments, strict=True
            ):
                row = tuple(ids[mask.bool()].tolist())
                by_segment.setdefault(int(seg), set()).add(person_of[row])
            seen.append(list(by_segment.values()))
            return super().step(batch, **kwargs)

    monkeypatch.setattr(client_module, "PrivacyEngine", Recording)
    reply = confined_train_round(round_message(recipe, run="run-b"), context(), recipe, own)
    assert int(reply.content["metrics"]["declined"]) == 0 and len(seen) == 2
    assert any(seen), "no person was sampled: the test checks nothing"
    for step in seen:
        assert all(len(people) == 1 for people in step), step
        assert len(step) == len({p for people in step for p in people})  # one segment each

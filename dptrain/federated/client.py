"""The federated client: local DP-SGD with the dptrain engine; the data holder owns its privacy.

The client's own settings (:class:`~dptrain.federated.holder.ClientConfig`: its state
directory -- ledger and run key --, budget ``(epsilon, delta)``, accountant and minimum noise
multiplier) come from its node config or a local file, never from the server.  The server's recipe only *asks*: one ``train``
message = one round on one client::

    refuse a request for a round it already trained in (its state's rounds.json: the server
        run's id ``server-run`` and ``server-round``, which must lie in 1..rounds), a round
        whose calibrated noise follows another ``N_k`` than the run's earlier rounds (the
        client's data changed during the run), and a request that is weaker than the client's own settings: another accountant, a
        larger epsilon or delta, or a noise multiplier below the client's minimum
        -> decline: reply {declined, reason, epsilon}, no adapter, nothing charged
    check the budget: do the round's T local steps fit the client's own budget on its
        persisted ledger (BudgetFilter)?  no -> decline with the reason
    set up the policy as ``dptrain train`` does: its set-up check (public data), declining
        with the same reason; after the engine is built, ``attach`` (public batches of
        ``data.public_path``), before the engine state is restored
    build the model, load the global adapters, freeze what the strategy keeps fixed
    T PrivacyEngine steps on Poisson batches of the client's own records; the ledger is saved
        atomically after every step (a crash leaves it covering every step taken), the engine
        state (policy state, noise position and pair count) once, when the round's steps end
    reply with the trained factors (A and B, or B alone) and public metadata; on an error
        after the ledger was read: {failed, fixed reason, epsilon of the ledger on disk},
        which covers every step charged, also one that failed after its charge

Privacy contract (per client, per record of that client): add/remove-one neighbouring
datasets of the client's records (their count ``N_k`` is public); each local step is the
engine's Poisson-subsampled Gaussian mechanism at ``q_k = batch_size / N_k``, charged to the
client's ledger before its update exists.  Coins and noise derive from the client's own run
key (``<state dir>/secret.key``, mode 0600), which never leaves the client.  The noise
multiplier is calibrated for the requested ``rounds * T`` steps at the requested budget, and
the budget filter refuses a round that would exceed the client's *own* budget over its whole
ledger -- across rounds, restarts and server runs (a new server run does not reset it).
The server's ``client_guarantee`` counts one request of at most ``T`` steps per round of
its run: the client trains at most once per (server run, round), recorded in its state
(``rounds.json``, atomically, before the round's first step), so a request Flower redelivers,
or a second node on the same partition-id sharing the state directory, is declined.  Two
nodes on one partition-id with *separate* state directories are two clients to this check;
if they hold the same records each of those records is trained twice per round (the
simulation and the loopback deployment start one node per partition-id and give each its
own state directory; the server marks a round where two nodes answered for one client).
What leaves the client is the trained adapter (post-processing of the noisy steps) and public
metadata: ``N_k`` (also the FedAvg weight ``num-examples``), ``q_k``, ``sigma``, steps, epsilon
and delta (with the noise sampler's truncation term), and ``insecure-seed`` (1 when the client's
coins and noise follow from its own ``insecure-seed``: the server's summary then warns that
its ``client_guarantee`` does not hold for that client).  Losses, timings and, under a person
unit, the record count stay on the client, and so does the text of any error it raises
(:func:`confined_train_round`: the server reads a fixed reason, never an exception's message).  Step ``t`` of the client's lifetime (its
ledger's step count) draws coins and noise at counter ``t``, so a lost ledger with a kept key
would repeat noise: the key is marked used before its first step (:mod:`dptrain.secret`) and
the client refuses to train with a used key and an empty or missing ledger, with a ledger of
fewer steps than its engine state recorded (a copy restored from an older backup), or with a
ledger but no ``rounds.json``.  After a crash
between the per-step ledger and the end-of-round engine state, the steps the engine state
lacks are counted at the most noise pairs a step of this client draws (at least one pair
per two trainable coordinates, plus the policy's noisy counts), an upper bound for the
truncation term.

A client's own privacy unit (``privacy-unit=FIELD`` in its settings): the client then
protects each of its PEOPLE with all of their records, by user-level DP-SGD
(:mod:`dptrain.user_level`, strategy ``user``): keyed Poisson coins over its ``N_k`` people
(``q_k = batch_size / N_k``, public like ``N_k``), each sampled person's (at most
``max-records-per-person``) records summed and clipped together, so one person moves the
clipped sum by at most ``C``; the ledger event is the same Poisson-subsampled Gaussian with
``q_k`` over people, its epsilon is per person, and the default delta is ``1/(10 N_k)``.  The
unit is fixed for the client's lifetime (``unit.json`` in its state directory, written
before its first step): a ledger of record-level steps says nothing per person, so a changed
unit is declined.  A person with records at several clients is protected by each of them
for the records it holds (composition over those clients bounds the total).

Set-up of a simulation.  Without ``data-path`` a client trains on its share of the recipe's
data: the held-out validation split and the non-IID partition are computed from a *public*
set-up key derived from ``recipe.seed``, so the server and every client agree on them without
sharing a secret and a new server run sees the same clients.  They stand in for data that
separate holders would own; each client's guarantee is over its own records ``D_k``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from accountants import Budget, BudgetExceeded, BudgetFilter, Event, Ledger

from ..data import DataError, LMExamples, TextDataset, bundled_path, load_texts, tokenize
from ..data.lm import eval_batches
from ..data.people import People, person_ids, read_people, recipe_person_ids
from ..data.splits import load_public, read_data, read_public
from ..engine import PrivacyEngine
from ..hardware import resolve_device
from ..models import build_model
from ..noise import GaussianNoise, pairs_for, truncation_delta
from ..optim import make_optimizer
from ..plan import plan_privacy, policy_setup_refusal, steps_that_fit
from ..policies import Policy, RunContext
from ..precision import Precision
from ..rundir import atomic_write
from ..sampling import PoissonSampler
from ..secret import KEY_FILE, RunKey, RunKeyError, run_key
from ..user_level import PersonSampler
from .holder import ClientConfig, ClientConfigError, Request, refusal
from .lora import get_strategy, load_lora_state
from .partition import partition
from .recipe import FederatedRecipe

MODEL_LOCK = threading.Lock()  # model construction seeds torch's global RNG
# (recipe, client, data path) -> (digest of the records as read, their tokenization)
_EXAMPLES: dict[tuple, tuple[bytes, LMExamples]] = {}
ClientConfigs = Callable[[Context], ClientConfig]


def setup_key(seed: int) -> RunKey:
    """The public key of a simulation's set-up (validation split, partition): see the module."""
    return RunKey(hashlib.sha256(f"dptrain federated set-up {seed} (public)".encode()).digest())


@functools.lru_cache(maxsize=4)
def _train_validation(recipe_json: str) -> tuple[TextDataset, TextDataset]:
    recipe = FederatedRecipe.model_validate_json(recipe_json)
    return read_data(recipe, setup_key(recipe.seed))


@functools.lru_cache(maxsize=4)
def _partition(recipe_json: str) -> list[TextDataset]:
    recipe = FederatedRecipe.model_validate_json(recipe_json)
    f = recipe.federated
    return partition(
        _train_validation(recipe_json)[0],
        f.clients,
        path=recipe.data.path,
        by=f.partition.by,
        alpha=f.partition.alpha,
        seed=recipe.seed,
        min_size=max(2, int(recipe.training.batch_size or 1)),
        format=recipe.data.format,
        text_field=recipe.data.text_field,
    )


def client_datasets(recipe: FederatedRecipe) -> list[TextDataset]:
    """Every client's training records (the recipe's non-IID split; cached per recipe)."""
    return _partition(recipe.model_dump_json())


def validation_dataset(recipe: FederatedRecipe) -> TextDataset:
    """The held-out records the server reports perplexity on."""
    return _train_validation(recipe.model_dump_json())[1]


@dataclass
class ClientPlan:
    """A client's public training constants, its calibrated policy and what the server asks."""

    client: int
    data: TextDataset
    sample_rate: float
    delta: float  # the client's own
    local_steps: int
    epsilon: float  # the client's own budget
    policy: Policy
    request: Request
    people: People | None = None  # the client's own privacy unit is the person

    @property
    def units(self) -> int:
        """``N_k``: the client's records, or its people under its own person unit."""
        return len(self.data) if self.people is None else len(self.people)


def _client_people(recipe: FederatedRecipe, own: ClientConfig, data: TextDataset) -> People:
    """The people of the client's records, by its own ``privacy-unit`` field (read from its
    ``data-path`` or, in a simulation, from the recipe's data file), by the reader
    ``dptrain train`` uses (:func:`~dptrain.data.people.recipe_person_ids`: the recipe's text
    field and task, so the record ids are the training records' own; a federated recipe's
    task is text, the only kind its clients train)."""
    if own.data_path:
        persons = person_ids(
            own.data_path, str(own.privacy_unit), text_field=recipe.data.text_field,
            task=recipe.task,
        )  # fmt: skip
    else:
        persons = recipe_person_ids(recipe, str(own.privacy_unit))
    return read_people(data, persons)


_DELTA_ANNOUNCED: set[Path] = set()  # clients whose default delta this process announced


def plan_client(recipe: FederatedRecipe, client: int, own: ClientConfig) -> ClientPlan:
    """Resolve a client's data, sample rate, steps per round and the noise the server's
    recipe asks for (calibrated for all ``rounds * steps`` local steps at the asked budget)."""
    if own.data_path:
        data = load_texts(own.data_path, text_field=recipe.data.text_field)
    else:
        parts = client_datasets(recipe)
        if not 0 <= client < len(parts):
            raise ClientConfigError(
                f"partition-id {client} is outside the recipe's {len(parts)} clients (0.."
                f"{len(parts) - 1}); fix the SuperNode's --node-config or federated.clients"
            )
        data = parts[client]
    people = _client_people(recipe, own, data) if own.privacy_unit is not None else None
    n = len(data) if people is None else len(people)
    unit = "records" if people is None else "people"
    plan = plan_privacy(recipe, n, repeats=recipe.federated.rounds, unit=unit)
    if own.delta is None and own.state_dir not in _DELTA_ANNOUNCED:  # said once, not silently
        _DELTA_ANNOUNCED.add(own.state_dir)  # (N_k is public metadata)
        print(
            f"client {client}: delta not set: using 1/(10 N) = {own.own_delta(n):.3g} "
            f"for its N = {n} {unit} (set the client's delta to choose another)",
            file=sys.stderr,
            flush=True,
        )
    asked = Request(
        float(recipe.privacy.epsilon),
        plan.delta,
        plan.accountant,
        None if plan.adaptive else float(plan.noise_multiplier),
    )
    return ClientPlan(
        client,
        data,
        plan.sample_rate,
        own.own_delta(n),
        plan.steps,
        own.epsilon,
        plan.policy,
        asked,
        people,
    )


class ClientState:
    """A client's state directory: ``secret.key`` (its run key, 0600; marked used before its
    first step), ``ledger.json`` (authoritative, saved after every step), ``engine.pt``
    (policy state, noise position, the most pairs a step drew; saved when a round ends) and
    ``rounds.json`` (the rounds of each server run it trained in, written before a round's
    first step: at most one training per round of a server run)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ledger_path = self.path / "ledger.json"
        self.engine_path = self.path / "engine.pt"
        self.key_path = self.path / KEY_FILE
        self.unit_path = self.path / "unit.json"
        self.rounds_path = self.path / "rounds.json"
        self._engine: tuple[dict[str, Any] | None] | None = None  # engine.pt as last read

    def _read_rounds(self) -> dict[str, Any]:
        return json.loads(self.rounds_path.read_text()) if self.rounds_path.exists() else {}

    def _rounds(self, data: dict[str, Any] | None = None) -> dict[str, list[int]]:
        runs = (self._read_rounds() if data is None else data).get("runs", {})
        return {str(k): [int(r) for r in v] for k, v in runs.items()}

    def changed_calibration(self, run: str, constants: dict[str, float] | None) -> str | None:
        """Why the client must not train in server run ``run`` with the calibrated
        ``constants`` (``q``, ``sigma``, ``delta``, ``T``): an earlier round of that run trained
        with others (None if not, or if ``constants`` is None: the noise was not calibrated).
        The run's ``client_guarantee`` (basis ``calibrated``) holds because all ``R T`` steps
        share one calibration for ``R T`` steps; steps calibrated for another ``N_k`` (the
        client's data changed mid-run) compose to more than the recipe's epsilon (the
        conversion of a mixture of RDP curves is not bounded by their conversions)."""
        if constants is None:
            return None
        first = self._read_rounds().get("calibrations", {}).get(run)
        if first is None or first == constants:
            return None
        return (
            f"refused: round constants {constants} differ from those of this client's earlier "
            f"rounds of server run {run} ({first}): its number of records or people changed "
            "during the run, and steps calibrated for two N_k exceed the run's "
            "client_guarantee. Nothing was charged. Fix: keep the client's data fixed during a "
            "server run (a changed data set trains in the next server run)"
        )

    def repeated_round(self, run: str, server_round: int) -> str | None:
        """Why the client must not train in round ``server_round`` of server run ``run``: it
        already trained in it (None if not).  The server's ``client_guarantee`` counts one
        request of at most ``T`` steps per round; a redelivered request, or a second node
        sharing this state directory, would train twice."""
        if server_round not in self._rounds().get(run, []):
            return None
        return (
            f"refused: this client already trained in round {server_round} of server run "
            f"{run} (a redelivered request, or a second node on its partition-id sharing its "
            "state-dir); a second training would exceed the run's client_guarantee of one "
            "request per round. Nothing was charged"
        )

    def record_round(
        self, run: str, server_round: int, constants: dict[str, float] | None = None
    ) -> None:
        """Record, atomically, that the client trains in ``server_round`` of ``run`` (before
        the round's first step is charged) and, for calibrated noise, the run's first round
        constants (:meth:`changed_calibration`)."""
        data = self._read_rounds()
        runs = self._rounds(data)
        runs[run] = sorted({*runs.get(run, []), server_round})
        data["runs"] = runs
        if constants is not None:
            data.setdefault("calibrations", {}).setdefault(run, constants)
        text = json.dumps(data, sort_keys=True) + "\n"
        atomic_write(self.rounds_path, lambda f: f.write(text))

    def changed_unit(self, unit: str) -> str | None:
        """Why the client must not train with privacy unit ``unit``: its ledger was spent
        for another one (None if it matches, or nothing is recorded yet)."""
        if not self.unit_path.exists():
            if self.ledger_path.exists():  # a ledger from before units were recorded
                return None if unit == "record" else self._changed("record", unit)
            return None
        was = json.loads(self.unit_path.read_text())["unit"]
        return None if was == unit else self._changed(was, unit)

    def _changed(self, was: str, unit: str) -> str:
        return (
            f"client state: {self.ledger_path} was spent with the privacy unit {was!r}, this "
            f"client now declares {unit!r}; its epsilon would mean something else. Fix: keep "
            "the unit, or start a new state-dir (a new budget only for new data)"
        )

    def record_unit(self, unit: str) -> None:
        atomic_write(self.unit_path, lambda f: f.write(json.dumps({"unit": unit}) + "\n"))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the state (a late round and the next one never interleave)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def ledger(self) -> Ledger:
        return Ledger.load(self.ledger_path) if self.ledger_path.exists() else Ledger()

    def key(self, insecure_seed: int | None) -> RunKey:
        """The client's own key (created on first use; see :func:`dptrain.secret.run_key`)."""
        return run_key(self.path, insecure_seed, create=True)

    def lost_ledger(self) -> str | None:
        """Why training must not continue: the client trained before (its engine state
        exists) but its ledger is gone -- the spent budget is unknown and, with the same key,
        step counters would restart and repeat noise already released."""
        if self.engine_path.exists() and not self.ledger_path.exists():
            return (
                f"{self.ledger_path} is missing although this client has trained before: its "
                "spent budget is unknown. Fix: restore ledger.json from a backup (a new "
                "state-dir starts a new budget only for new data)"
            )
        return None

    def lost_rounds(self) -> str | None:
        """Why training must not continue: the client has charged steps (its ledger exists)
        but ``rounds.json``, written before every round's first step, is gone -- the rounds
        it trained in are unknown, so a repeated request would train twice."""
        if self.ledger_path.exists() and not self.rounds_path.exists():
            return (
                f"{self.rounds_path} is missing although this client has trained before: the "
                "rounds it trained in are unknown, and training a round twice would exceed the "
                "run's client_guarantee. Fix: restore rounds.json from the backup that holds "
                "its ledger.json (a new state-dir starts a new budget only for new data)"
            )
        return None

    def rolled_back(self, ledger: Ledger) -> str | None:
        """Why training must not continue: ``ledger`` has fewer steps than the engine state
        saved at the end of the client's last round -- the ledger was restored from an older
        copy, so steps it lacks were spent and their counters would draw the same noise again
        (two releases with one noise reveal their difference)."""
        saved = self.load_engine()
        if saved is None:
            return None
        taken = int(saved["engine"]["steps_taken"])
        if ledger.total_steps >= taken:
            return None
        return (
            f"{self.ledger_path} holds {ledger.total_steps} steps, but this client's state "
            f"({self.engine_path}) recorded {taken} at the end of its last round: the ledger "
            "was rolled back, and continuing would charge too little and repeat the noise of "
            "the steps it lacks. Fix: restore the ledger.json saved with engine.pt (the "
            "newest copy)"
        )

    def load_engine(self) -> dict[str, Any] | None:
        """``engine.pt`` (None if absent), read once per state object: the round's check
        (:meth:`rolled_back`) and its restore share one read until :meth:`save_engine`."""
        if self._engine is None:
            saved = None
            if self.engine_path.exists():
                saved = torch.load(self.engine_path, map_location="cpu", weights_only=True)
            self._engine = (saved,)
        return self._engine[0]

    def save_engine(self, state: dict[str, Any]) -> None:
        atomic_write(self.engine_path, lambda f: torch.save(state, f), binary=True)
        self._engine = None


def _reply(msg: Message, metrics: dict[str, Any], **records: Any) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics), **records}), reply_to=msg)


def _decline(msg: Message, public: dict[str, Any], epsilon: float, reason: str) -> Message:
    metrics = {**public, "declined": 1, "epsilon": epsilon, "steps": 0}
    return _reply(msg, metrics, status=ConfigRecord({"reason": reason}))


def _server_round(msg: Message, recipe: FederatedRecipe) -> tuple[str, int] | str:
    """The request's (server run, round), or why the client refuses it: a round must name
    its server run (``server-run``) and lie in ``1..federated.rounds``, the requests the
    server's ``client_guarantee`` counts."""
    config = msg.content["config"] if "config" in msg.content else None
    run = config.get("server-run") if config is not None else None
    rnd = config.get("server-round") if config is not None else None
    if not isinstance(run, str) or not run:
        return (
            "refused: the request names no server run (config 'server-run'), so this client "
            "cannot train at most once per round. Fix: run the server of this dptrain version"
        )
    rounds = recipe.federated.rounds
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= rounds:
        return (
            f"refused: the request's round {rnd!r} is not one of the recipe's rounds 1..{rounds} "
            "that the run's client_guarantee counts"
        )
    return run, rnd


def _over_budget(plan: ClientPlan, ledger: Ledger, filt: BudgetFilter, spent: float) -> str | None:
    """Why the round's local steps do not fit the budget (``spent``: the filter's epsilon of
    ``ledger``), or None if they do (:func:`~dptrain.plan.steps_that_fit`)."""
    fit = steps_that_fit(plan.policy, plan.sample_rate, filt, ledger, plan.local_steps)
    if fit is None or fit[1] >= plan.local_steps:
        return None
    event, fits = fit
    return (
        f"budget: {plan.local_steps} more local steps (q={plan.sample_rate:.4g}, "
        f"sigma={event.noise_multiplier:.4g}) would exceed epsilon={plan.epsilon:g} at "
        f"delta={plan.delta:.3g}; spent {spent:.4f} after {ledger.total_steps} steps, "
        f"{fits} more fit"
    )


def _calibration(recipe: FederatedRecipe, plan: ClientPlan) -> dict[str, float] | None:
    """The constants a calibrated round's noise follows (``q``, ``sigma``, ``delta``, ``T``), or
    None when the noise is not calibrated (a fixed noise multiplier, an adaptive policy)."""
    if recipe.policy.noise_multiplier is not None or plan.policy.adaptive:
        return None
    return {
        "sample_rate": float(plan.sample_rate),
        "noise_multiplier": _noise_multiplier(plan.policy),
        "delta": float(plan.request.delta),
        "local_steps": float(plan.local_steps),
    }


def plan_steps(ledger: Ledger, local_steps: int, rounds: int, server_round: int) -> int:
    """The last lifetime step of this server run's plan: ``t + (R - r + 1) T`` for a ledger
    of ``t`` steps at round ``r`` of ``R`` with ``T`` local steps per round (the policy's
    step counter is the ledger's, across server runs)."""
    return ledger.total_steps + (rounds - server_round + 1) * local_steps


def _claimed(plan: ClientPlan, spent: float, ledger: Ledger) -> float:
    """The epsilon a client reports for ``ledger``: its spend ``spent``; under an adaptive
    policy, once a step is charged, its filter's budget -- the certified epsilon, as in
    :func:`dptrain.plan.guarantee_numbers` (the spend is then an odometer reading, not a
    guarantee)."""
    return plan.epsilon if plan.policy.adaptive and ledger.events else spent


def _noise_multiplier(policy: Policy) -> float:
    sigma = policy.noise_multiplier
    return float(sigma) if sigma is not None else math.nan


def _pairs_per_step(engine: PrivacyEngine) -> int:
    """The most Gaussian pairs one release draws: the parameters' noise (one noise tensor per
    trainable parameter) and the policy's noisy counts (the rl policy's, on a count step;
    counted at every step, an upper bound that does not depend on where a round stops)."""
    counts = engine.policy.max_noised_counts
    return pairs_for(engine.params) + (counts + 1) // 2


def _restore_engine(
    engine: PrivacyEngine,
    sampler: PoissonSampler | PersonSampler,
    noise: GaussianNoise,
    ledger: Ledger,
    saved: dict[str, Any] | None,
) -> int:
    """Continue the noise position, the pair count and the policy state of ``saved`` (the
    end of the client's last round) at the ledger's step count; returns the pairs a step is
    counted at for steps the saved state lacks (a crash mid-round)."""
    per_step = max(int((saved or {}).get("pairs_per_step", 0)), _pairs_per_step(engine))
    if saved is not None:
        so_far = {"ledger": ledger.to_dict(), "steps_taken": ledger.total_steps}
        engine.load_state_dict({**saved["engine"], **so_far})
        sampler.load_state_dict(saved["sampler"])
        behind = ledger.total_steps - int(saved["engine"]["steps_taken"])
        noise.pairs += max(behind, 0) * per_step
    elif ledger.total_steps:  # a crash in the client's first round (or an older state)
        noise.pairs = ledger.total_steps * per_step
    return per_step


def _local_steps(
    engine: PrivacyEngine,
    sampler: PoissonSampler | PersonSampler,
    examples: LMExamples,
    steps: int,
    state: ClientState,
    per_step: int,
) -> int:
    """Up to ``steps`` private steps; the ledger is saved after each (it never covers fewer
    steps than were taken), the engine state once, after the last.  A step that fails after
    the engine charged it (the charge comes before its update reaches the model) is saved
    too: the ledger on disk covers every charge.  Returns steps taken."""
    taken, noise = 0, engine.noise
    on_disk = engine.ledger.total_steps
    try:
        for _ in range(steps):
            before = noise.pairs
            try:
                if isinstance(sampler, PersonSampler):  # each person's records: one segment
                    batch, segments = sampler.batch(engine.steps_taken, examples)
                    engine.step(batch, segments=segments)
                else:
                    engine.step(examples.batch(sampler.sample(engine.steps_taken)))
            except BudgetExceeded:
                break
            except BaseException:
                if engine.ledger.total_steps > on_disk:  # charged, then failed
                    engine.ledger.save(state.ledger_path)
                raise
            engine.ledger.save(state.ledger_path)
            on_disk = engine.ledger.total_steps
            per_step = max(per_step, noise.pairs - before)
            taken += 1
        if taken:
            engine_state = engine.state_dict()
            engine_state.pop("ledger")  # ledger.json is the authoritative copy
            state.save_engine(
                {
                    "engine": engine_state,
                    "sampler": sampler.state_dict(),
                    "pairs_per_step": per_step,
                }
            )
    finally:
        engine.detach()
    return taken


class ClientFailed(Exception):
    """A round failed after the client's ledger was read: ``reply`` tells the server the
    fixed reason :data:`CLIENT_FAILED` and the spend of the whole planned round (at least its
    ledger's epsilon, covering every step it charged before the failure: :func:`_failed`),
    never the error's text or the step it failed at."""

    def __init__(self, reply: Message) -> None:
        super().__init__(CLIENT_FAILED)
        self.reply = reply


def _records_digest(data: TextDataset) -> bytes:
    """SHA-256 of the records' ids and texts in their order."""
    h = hashlib.sha256()
    for rid, text in zip(data.ids, data.texts, strict=True):
        for part in (rid, text):
            b = part.encode()
            h.update(len(b).to_bytes(8, "little") + b)
    return h.digest()


def _examples(
    recipe: FederatedRecipe, client: int, own: ClientConfig, data: TextDataset, tokenizer: Any
) -> LMExamples:
    """``data`` tokenized, once per process for the same records in the same order (a
    simulation's clients and a client's rounds tokenize once).  Keyed by the records as read
    this round, not by the file's path alone: the sampler's indices (a person's members) are
    positions in ``data``, so rows of an earlier version of the file would put other records
    at them -- under a person unit one person's records in several segments, each clipped at
    ``C``."""
    cache = (recipe.model_dump_json(), client, own.data_path)
    digest = _records_digest(data)
    hit = _EXAMPLES.get(cache)
    if hit is not None and hit[0] == digest:
        return hit[1]
    examples = tokenize(data, tokenizer, recipe.data.max_length)
    _EXAMPLES[cache] = (digest, examples)
    return examples


def _public_texts(recipe: FederatedRecipe, data: TextDataset, key: RunKey) -> TextDataset | None:
    """The records the recipe declares public (``data.public_path``, read as ``dptrain train``
    reads it: :func:`~dptrain.data.splits.read_public`, records shared with the client's
    refused), or None.  A federated recipe cannot declare a share of a client's own records
    public (:class:`~dptrain.federated.recipe.FederatedRecipe`).  The file is read once per
    process (:func:`_cached_public`); the shared-records check and the keyed cap run every
    round."""
    if recipe.data.public_path is None:
        return None
    return read_public(recipe, data, key, load=_cached_public)[1]


_PUBLIC: dict[tuple, TextDataset] = {}  # data.public_path as read, by the file's identity
_PUBLIC_KEPT = 4


def _file_identity(path: str) -> tuple[tuple[str, int, int], ...]:
    """``(path, mtime_ns, size)`` of a data path's file, or of every file under a directory
    (a saved dataset); ``bundled:NAME[:SPLIT]`` is the bundled file.  OSError if absent."""
    if path.startswith("bundled:"):
        p = bundled_path(path.split(":")[1])
    else:
        p = Path(path).expanduser()
    p = p.resolve(strict=True)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return tuple((str(f), st.st_mtime_ns, st.st_size) for f in files for st in (f.stat(),))


def _cached_public(recipe: FederatedRecipe) -> TextDataset:
    """:func:`~dptrain.data.splits.load_public`, once per process for an unchanged file (the
    same path, modification time and size) and the same loader settings: a client's rounds,
    and a simulation's clients, read it once; a changed file is read again.  A copy of the
    lists is returned, so no caller can change what the next round reads."""
    d = recipe.data
    try:
        identity = _file_identity(str(d.public_path))
    except (OSError, DataError):  # absent or unknown: the loader gives its error
        return load_public(recipe)
    key = (identity, d.public_path, d.text_field, d.format, d.text_records)
    key += (recipe.task.model_dump_json(),)
    public = _PUBLIC.get(key)
    if public is None:
        public = load_public(recipe)
        while len(_PUBLIC) >= _PUBLIC_KEPT:
            _PUBLIC.pop(next(iter(_PUBLIC)))
        _PUBLIC[key] = public
    return TextDataset(list(public.texts), list(public.ids))


def train_round(
    msg: Message, context: Context, recipe: FederatedRecipe, own: ClientConfig | None
) -> Message:
    """Handle one ``train`` message (see the module docstring).  ``own`` is this client's
    own settings; None: read them from the node config.  The policy is set up as
    ``dptrain train`` sets it up (:func:`~dptrain.plan.policy_setup_refusal` before the
    model is built, a refusal declining the round with its reason; ``attach`` after the
    engine is built and before the engine state is restored).  An error once the ledger is
    read raises :class:`ClientFailed` carrying the spend so far."""
    cfg = context.node_config
    client = int(cfg.get("partition-id", 0))
    if own is None:
        try:
            own = ClientConfig.from_node_config(cfg)
        except ClientConfigError as err:
            return _decline(msg, {"client": client}, 0.0, f"client settings: {err}")
    plan = plan_client(recipe, client, own)
    state = ClientState(own.state_dir)
    strategy = get_strategy(recipe.federated.strategy)
    budget = Budget(plan.epsilon, plan.delta)
    public = {
        "client": client,
        # the FedAvg weight: N_k, public (records, or the people of a person unit: their
        # record count beside N_k would tell the server a person's number of records)
        "num-examples": plan.units,
        "num-people": 0 if plan.people is None else len(plan.people),  # 0: the record unit
        "sample-rate": plan.sample_rate,
        "delta": plan.delta,
        "noise-multiplier": _noise_multiplier(plan.policy),
        # 1: this client's coins and noise follow from its insecure-seed, not a secret key: no
        # guarantee for its records, which the server's report must say (a setting, not data)
        "insecure-seed": int(own.insecure_seed is not None),
    }
    asked = _server_round(msg, recipe)
    with state.lock():
        ledger = state.ledger()
        filt = BudgetFilter(budget, own.accountant, adaptive=plan.policy.adaptive)
        spent = _claimed(plan, filt.spent(ledger) if ledger.events else 0.0, ledger)
        if isinstance(asked, str):
            return _decline(msg, public, spent, asked)
        server_run, server_round = asked
        calibrated = _calibration(recipe, plan)
        reason = (
            state.repeated_round(server_run, server_round)
            or state.changed_calibration(server_run, calibrated)
            or refusal(plan.request, own, plan.units)
            or state.changed_unit(own.unit)
            or state.lost_ledger()
            or state.lost_rounds()
            or state.rolled_back(ledger)
            or _over_budget(plan, ledger, filt, spent)
        )
        if reason is not None:
            return _decline(msg, public, spent, reason)
        noise: GaussianNoise | None = None
        start = list(ledger.events)  # the round's start (the engine appends to ``ledger``)
        pairs_bound: list[int] = []  # the pairs the whole round draws at most, once known
        try:
            key = state.key(own.insecure_seed)  # never leaves the client
            if not ledger.total_steps:
                try:
                    key.refuse_restart(state.key_path, f"{state.ledger_path} holds no step")
                except RunKeyError as err:
                    return _decline(msg, public, spent, f"client state: {err}")
            public_texts = _public_texts(recipe, plan.data, key)
            reason = policy_setup_refusal(
                plan.policy,
                public_records=None if public_texts is None else len(public_texts),
                kind="federated",
            )
            if reason is not None:  # a function of the recipe: the same error as dptrain train
                return _decline(msg, public, spent, reason)
            with MODEL_LOCK:
                model, tokenizer = build_model(recipe, resolve_device(recipe.training.device))
            load_lora_state(model, msg.content["arrays"].to_torch_state_dict())
            for name, p in model.named_parameters():
                p.requires_grad_(strategy.trainable(name))
            examples = _examples(recipe, client, own, plan.data, tokenizer)
            params = [p for p in model.parameters() if p.requires_grad]
            noise = GaussianNoise(key)
            engine = PrivacyEngine(
                model,
                make_optimizer(recipe.training, params),
                policy=plan.policy,
                sample_rate=plan.sample_rate,
                dataset_size=plan.units,
                grouping=recipe.policy.grouping,
                accountant=own.accountant,
                budget=budget,
                ledger=ledger,
                max_physical_batch_size=recipe.training.physical_batch_size,
                noise=noise,
                precision=Precision(recipe.training.precision, recipe.training.loss_scale),
                max_length=recipe.data.max_length,
                pad=examples.pad,  # as dptrain train: outputs must not follow the padding
            )
            public_batches = None
            if public_texts is not None:
                public_ex = tokenize(public_texts, tokenizer, recipe.data.max_length)
                public_batches = eval_batches(public_ex, recipe.training.physical_batch_size)
            # as dptrain train: attached once the engine is bound, before its state is restored;
            # planned: the policy's step counter is the client's lifetime one (its ledger), so
            # the plan ends where this server run's requests can end: the steps taken so far
            # plus T for each round left, this one included (a pacer paces what is left of
            # the budget over them; in a first run that trains every round: rounds x T)
            planned = plan_steps(ledger, plan.local_steps, recipe.federated.rounds, server_round)
            plan.policy.attach(RunContext(model, planned, recipe.seed, public_batches))
            sampler: PoissonSampler | PersonSampler
            if plan.people is not None:  # the client's own unit: keyed coins over its people
                cap = own.max_records_per_person
                sampler = PersonSampler(plan.people, examples.ids, plan.sample_rate, key, cap)
            else:
                sampler = PoissonSampler(examples.ids, plan.sample_rate, key)
            per_step = _restore_engine(engine, sampler, noise, ledger, state.load_engine())
            pairs_bound.append(noise.pairs + plan.local_steps * per_step)
            key.mark_used(state.key_path)  # before its first step draws coins and noise
            state.record_unit(own.unit)  # before its first step is charged to the ledger
            state.record_round(server_run, server_round, calibrated)  # likewise: once per round
            taken = _local_steps(engine, sampler, examples, plan.local_steps, state, per_step)
            eps = _claimed(plan, engine.epsilon(), engine.ledger)
        except Exception as err:  # the spend so far (the ledger on disk covers every charge)
            raise _failed(msg, plan, public, filt, state, start, noise, pairs_bound) from err
    public["delta"] = plan.delta + truncation_delta(eps, noise.pairs)
    if taken == 0:
        return _decline(msg, public, eps, f"budget: no local step fits epsilon={plan.epsilon:g}")
    trained = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return _reply(
        msg,
        {**public, "declined": 0, "epsilon": eps, "steps": taken},
        arrays=ArrayRecord(trained),
    )


CLIENT_FAILED = (
    "the client failed; its error stays on the client (see its log): an error message can "
    "quote its records, people or batch sizes"
)


def _failed(
    msg: Message,
    plan: ClientPlan,
    public: dict[str, Any],
    filt: BudgetFilter,
    state: ClientState,
    start: list[Event],
    noise: GaussianNoise | None,
    pairs_bound: list[int],
) -> ClientFailed:
    """:class:`ClientFailed` with a spend that does not depend on where the round failed: that
    of the whole planned round (``start``, the ledger's events when it began, and
    ``plan.local_steps`` planned steps; an adaptive policy's budget), at least the ledger on
    disk (which covers every charge); its delta's truncation term counts the pairs of the
    whole planned round (the pairs before it plus ``plan.local_steps`` times the most a step
    draws, :func:`_pairs_per_step`), not those drawn before the failure.  How many steps ran
    before the failure (an out-of-memory error on a large Poisson batch) is a function of the
    private data: it is not sent."""
    ledger = state.ledger()
    actual = _claimed(plan, filt.spent(ledger) if ledger.events else 0.0, ledger)
    planned = plan.policy.planned_event(plan.sample_rate)
    if plan.policy.adaptive or planned is None:
        bound = plan.epsilon  # the filter's budget: certified whatever the round did
    else:
        bound = filt.spent(Ledger([*start, planned.with_steps(plan.local_steps)]))
    eps = max(actual, bound)
    pairs = max(pairs_bound or [0], default=0)
    if noise is not None:
        pairs = max(pairs, noise.pairs)
    metrics = {
        **public,
        "delta": public["delta"] + truncation_delta(eps, pairs),
        "declined": 0,
        "failed": 1,
        "epsilon": eps,
        "steps": plan.local_steps,  # planned: the steps taken are not sent
    }
    return ClientFailed(_reply(msg, metrics, status=ConfigRecord({"reason": CLIENT_FAILED})))


def confined_train_round(
    msg: Message, context: Context, recipe: FederatedRecipe, own: ClientConfig | None
) -> Message:
    """:func:`train_round`, with any error kept on the client: its traceback goes to the
    client's stderr and the server gets the fixed reason :data:`CLIENT_FAILED`.  Flower would
    send the exception's text, which is not reviewed for privacy (a data error quotes a
    record's field, an out-of-memory error the size of a Poisson batch); the server learns
    only that the client failed, as it would from a client that went silent, and -- when the
    client could read its ledger -- the spend of the whole planned round (a failure after
    charging steps must not leave the server with a smaller epsilon than the client spent)."""
    try:
        return train_round(msg, context, recipe, own)
    except ClientFailed as failed:
        traceback.print_exception(failed.__cause__ or failed, file=sys.stderr)
        sys.stderr.flush()
        return failed.reply
    except Exception:  # everything a ClientApp can raise: Flower would forward it
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, CLIENT_FAILED), reply_to=msg)


def make_client_app(
    recipe: FederatedRecipe, configs: ClientConfigs | None = None, mods: list[Mod] | None = None
) -> ClientApp:
    """A Flower ``ClientApp`` running :func:`confined_train_round` for ``recipe``; ``configs`` gives
    each client's own settings from its context (default: its node config); ``mods`` are
    Flower mods wrapped around it."""
    app = ClientApp(mods=list(mods or []))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return confined_train_round(msg, context, recipe, configs(context) if configs else None)

    return app

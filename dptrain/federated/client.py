"""The federated client: local DP-SGD with the dptrain engine, and a ledger that persists.

One ``train`` message = one round on one client::

    check the budget: do the round's T local steps fit (BudgetFilter on the persisted ledger)?
        no  -> decline: reply {declined, reason, epsilon}, no adapter
    build the model, load the global adapters, freeze what the strategy keeps fixed
    T PrivacyEngine steps on Poisson batches of the client's own records; the ledger is
        saved atomically after every step (so a crash leaves it covering every step taken)
    reply with the trained factors (A and B, or B alone) and public metadata

Privacy contract (per client, per record of that client): add/remove-one neighbouring
datasets of the client's records; each local step is the engine's Poisson-subsampled
Gaussian mechanism at the client's rate ``q_k = batch_size / N_k`` with the recipe's policy,
charged to the client's ledger before its update exists.  The noise multiplier is calibrated
once for the client's whole participation (``rounds * T`` steps) at its ``(epsilon, delta)``,
and the budget filter refuses a round that would exceed it, so the epsilon reported is over
all rounds, across restarts (the ledger lives in the client's state directory).  What leaves
the client is the trained adapter (post-processing of the noisy steps) and public metadata:
``N_k``, ``q_k``, ``sigma``, steps and epsilon, as ``dptrain train`` treats them.  Losses
stay on the client.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from accountants import Budget, BudgetExceeded, BudgetFilter, Ledger

from ..data import LMExamples, TextDataset, load_texts, tokenize
from ..engine import PrivacyEngine
from ..noise import GaussianNoise
from ..policies import Policy
from ..recipe import check_against_data
from ..rundir import atomic_write
from ..sampling import PoissonSampler
from ..train import build_model, build_policy, make_optimizer, read_data
from .lora import get_strategy, load_lora_state
from .partition import partition
from .recipe import FederatedRecipe

MODEL_LOCK = threading.Lock()  # model construction seeds torch's global RNG
_EXAMPLES: dict[tuple, LMExamples] = {}


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (distinct streams per client and purpose)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@functools.lru_cache(maxsize=4)
def _train_validation(recipe_json: str) -> tuple[TextDataset, TextDataset]:
    return read_data(FederatedRecipe.model_validate_json(recipe_json))


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
    )


def client_datasets(recipe: FederatedRecipe) -> list[TextDataset]:
    """Every client's training records (the recipe's non-IID split; cached per recipe)."""
    return _partition(recipe.model_dump_json())


def validation_dataset(recipe: FederatedRecipe) -> TextDataset:
    """The held-out records the server reports perplexity on."""
    return _train_validation(recipe.model_dump_json())[1]


@dataclass
class ClientPlan:
    """A client's public training constants and its calibrated policy."""

    client: int
    data: TextDataset
    sample_rate: float
    delta: float
    local_steps: int
    epsilon: float
    policy: Policy


def plan_client(
    recipe: FederatedRecipe,
    client: int,
    *,
    data_path: str | None = None,
    epsilon: float | None = None,
) -> ClientPlan:
    """Resolve a client's data, sample rate, delta, steps per round and noise (calibrated for
    all ``rounds * steps`` local steps at its budget)."""
    if data_path:
        data = load_texts(data_path, text_field=recipe.data.text_field)
    else:
        parts = client_datasets(recipe)
        if not 0 <= client < len(parts):
            raise ValueError(
                f"partition-id {client} is outside the recipe's {len(parts)} clients (0.."
                f"{len(parts) - 1}); fix the SuperNode's --node-config or federated.clients"
            )
        data = parts[client]
    q, delta, steps = check_against_data(recipe, len(data))
    eps = recipe.privacy.epsilon if epsilon is None else float(epsilon)
    policy = build_policy(recipe)
    if getattr(policy, "noise_multiplier", 0) is None:
        total = steps * recipe.federated.rounds
        policy.calibrate(eps, delta, total, q, recipe.privacy.accountant)
    return ClientPlan(client, data, q, delta, steps, eps, policy)


class ClientState:
    """A client's state directory: ``ledger.json`` (authoritative, saved after every step),
    ``engine.pt`` (policy state, noise and sampler generators, saved after each round)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ledger_path = self.path / "ledger.json"
        self.engine_path = self.path / "engine.pt"

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

    def load_engine(self) -> dict[str, Any] | None:
        if not self.engine_path.exists():
            return None
        return torch.load(self.engine_path, map_location="cpu", weights_only=True)

    def save_engine(self, state: dict[str, Any]) -> None:
        atomic_write(self.engine_path, lambda f: torch.save(state, f), binary=True)


def _reply(msg: Message, metrics: dict[str, Any], **records: Any) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics), **records}), reply_to=msg)


def _decline(msg: Message, public: dict[str, Any], epsilon: float, reason: str) -> Message:
    metrics = {**public, "declined": 1, "epsilon": epsilon, "steps": 0}
    return _reply(msg, metrics, status=ConfigRecord({"reason": reason}))


def _over_budget(plan: ClientPlan, ledger: Ledger, filt: BudgetFilter) -> str | None:
    """Why the round's local steps do not fit the budget, or None if they do (policies that
    plan adaptively are stopped by the engine's own filter instead)."""
    event = plan.policy.planned_event(plan.sample_rate)
    if event is None:
        return None
    fits = filt.max_steps(ledger, event)
    if fits >= plan.local_steps:
        return None
    spent = filt.spent(ledger) if ledger.events else 0.0
    return (
        f"budget: {plan.local_steps} more local steps (q={plan.sample_rate:.4g}, "
        f"sigma={event.noise_multiplier:.4g}) would exceed epsilon={plan.epsilon:g} at "
        f"delta={plan.delta:.3g}; spent {spent:.4f} after {ledger.total_steps} steps, "
        f"{fits} more fit"
    )


def _local_steps(
    engine: PrivacyEngine,
    sampler: PoissonSampler,
    examples: LMExamples,
    steps: int,
    state: ClientState,
) -> int:
    """Up to ``steps`` private steps; the ledger is saved after each.  Returns steps taken."""
    taken = 0
    try:
        for _ in range(steps):
            try:
                engine.step(examples.batch(sampler.sample()))
            except BudgetExceeded:
                break
            engine.ledger.save(state.ledger_path)
            taken += 1
    finally:
        engine.detach()
    engine_state = engine.state_dict()
    engine_state.pop("ledger")  # ledger.json is the authoritative copy
    state.save_engine({"engine": engine_state, "sampler": sampler.state_dict()})
    return taken


def train_round(
    msg: Message, context: Context, recipe: FederatedRecipe, state_root: str | Path
) -> Message:
    """Handle one ``train`` message (see the module docstring)."""
    cfg = context.node_config
    client = int(cfg.get("partition-id", 0))
    plan = plan_client(recipe, client, data_path=cfg.get("data-path"), epsilon=cfg.get("epsilon"))
    state = ClientState(cfg.get("state-dir") or Path(state_root) / f"client-{client}")
    strategy = get_strategy(recipe.federated.strategy)
    budget = Budget(plan.epsilon, plan.delta)
    public = {
        "client": client,
        "num-examples": len(plan.data),
        "sample-rate": plan.sample_rate,
        "delta": plan.delta,
        "noise-multiplier": float(getattr(plan.policy, "noise_multiplier", float("nan"))),
    }
    with state.lock():
        ledger = state.ledger()
        filt = BudgetFilter(budget, recipe.privacy.accountant, adaptive=plan.policy.adaptive)
        reason = _over_budget(plan, ledger, filt)
        if reason is not None:
            return _decline(msg, public, filt.spent(ledger) if ledger.events else 0.0, reason)

        with MODEL_LOCK:
            model, tokenizer = build_model(recipe)
        load_lora_state(model, msg.content["arrays"].to_torch_state_dict())
        for name, p in model.named_parameters():
            p.requires_grad_(strategy.trainable(name))
        key = (recipe.model_dump_json(), client, cfg.get("data-path"))
        examples = _EXAMPLES.get(key) or tokenize(plan.data, tokenizer, recipe.data.max_length)
        _EXAMPLES[key] = examples  # a simulation's clients tokenize once, not every round
        params = [p for p in model.parameters() if p.requires_grad]
        engine = PrivacyEngine(
            model,
            make_optimizer(recipe, params),
            policy=plan.policy,
            sample_rate=plan.sample_rate,
            dataset_size=len(examples),
            grouping=recipe.policy.grouping,
            accountant=recipe.privacy.accountant,
            budget=budget,
            ledger=ledger,
            max_physical_batch_size=recipe.training.physical_batch_size,
            noise=GaussianNoise(
                derive_seed(recipe.seed, client, "noise"), secure=recipe.privacy.secure_noise
            ),
        )
        sampler = PoissonSampler(
            len(examples), plan.sample_rate, seed=derive_seed(recipe.seed, client, "batches")
        )
        saved = state.load_engine()
        if saved is not None:  # continue the noise, sampler and policy streams
            so_far = {"ledger": ledger.to_dict(), "steps_taken": ledger.total_steps}
            engine.load_state_dict({**saved["engine"], **so_far})
            sampler.load_state_dict(saved["sampler"])
        taken = _local_steps(engine, sampler, examples, plan.local_steps, state)
        eps = engine.epsilon()
    if taken == 0:
        return _decline(msg, public, eps, f"budget: no local step fits epsilon={plan.epsilon:g}")
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return _reply(
        msg,
        {**public, "declined": 0, "epsilon": eps, "steps": taken},
        arrays=ArrayRecord(trained),
    )


def make_client_app(
    recipe: FederatedRecipe, state_root: str | Path, mods: list[Mod] | None = None
) -> ClientApp:
    """A Flower ``ClientApp`` running :func:`train_round` for ``recipe``; ``mods`` are
    Flower mods wrapped around it."""
    app = ClientApp(mods=list(mods or []))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train_round(msg, context, recipe, state_root)

    return app

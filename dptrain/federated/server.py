"""The federated server: a Flower ``ServerApp`` that runs :class:`LoraFedAvg` for a recipe and
writes a run directory like ``dptrain train``'s.

Run directory (``README.txt`` in it says what may be published, see :mod:`dptrain.rundir`)::

    secret.key         PRIVATE. The server's run key (0600): client-level DP coins and noise;
                       marked used when the run starts, never reused by another run
    recipe.yaml        the recipe
    run.json           strategy, clients, rounds, the guarantee every client has for this
                       run (client_guarantee: a function of the recipe, :func:`client_guarantee`)
                       and, with client-level DP, the client-level one
    private/metrics.jsonl  PRIVATE. One line per round: global validation perplexity, each
                       client's status (trained / declined + reason / failed + reason), epsilon
    private/stats.json     PRIVATE. The validation perplexity before, after and by round,
                       the training time, each client's last reported (epsilon, delta)
                       (client_epsilon, client_delta) and who may have spent more
                       (client_epsilon_unconfirmed: its last request got no reply with a spend)

Each client's reported spend is private, with or without client-level DP: which clients
replied in which round, and so how far each ledger got, can follow the private data (an
out-of-memory error on a large Poisson batch, a slow step on long records miss a round), as
timings do (:mod:`dptrain.publication`).  run.json states instead what holds for every client
whatever it replied (:func:`client_guarantee`).
    ledger.json        client-level DP ledger (only with federated.client_dp)
    checkpoints/       global adapters after each round (step-<round>.pt)
    final/             the final global adapter and tokenizer, loadable with peft

Each round's ledger (client-level DP) is saved, atomically, before the round's lines are
printed or logged: no output shows a round the ledger on disk does not cover.

Client state (ledgers, keys) never lives here: each client keeps it in its own state
directory (``federated.state_dir/client-k`` in a simulation), which outlives server runs.

The server evaluates the global model on the held-out validation split after every round;
that split never trains anything and steers nothing (it is reported, as in ``dptrain train``).
The global model and the server step's linear algebra use the recipe's ``training.device``;
the adapters travel, and are checkpointed, as CPU tensors.
"""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from accountants import get_accountant

from ..data import tokenize
from ..data.lm import eval_batches
from ..losses import perplexity
from ..models import build_model
from ..noise import pairs_for, truncation_delta
from ..policies import policy_from_recipe
from ..recipe import RecipeError, dump_recipe
from ..rundir import PUBLIC_FILES, RunDir, atomic_write, save_final, versions
from ..secret import RunKey, run_key
from .client import MODEL_LOCK, validation_dataset
from .lora import load_lora_state, lora_state
from .recipe import FederatedRecipe
from .strategy import LoraFedAvg, RoundReport


def start_run(recipe: FederatedRecipe, run_dir: str | Path | None = None) -> RunDir:
    """Create the run directory (refusing one that already holds a run)."""
    run = RunDir(recipe.run_dir(run_dir))
    if run.exists():
        raise RecipeError(
            f"output directory {run.path} already holds a run. Fix: choose another "
            "output_dir / --output (client ledgers persist in federated.state_dir)."
        )
    run.path.mkdir(parents=True, exist_ok=True)
    key = server_key(recipe, run)
    key.refuse_restart(run.key, f"{run.path} holds no run any more (no run.json)")
    key.mark_used(run.key)  # before any round draws from it
    run.write_readme()
    atomic_write(run.recipe, lambda f: f.write(dump_recipe(recipe)))
    f = recipe.federated
    run.write_meta(
        {
            "name": recipe.name,
            "kind": "federated",
            "fingerprint": recipe.fingerprint(),
            "run_id": new_run_id(),
            "status": "running",
            "strategy": f.strategy,
            "clients": f.clients,
            "rounds": f.rounds,
            "min_clients": f.min_clients,
            "epsilon_budget_per_client": recipe.privacy.epsilon,
            "accountant": recipe.privacy.accountant,
            "client_dp": f.client_dp.model_dump() if f.client_dp else None,
            "randomness": key.describe(),
            "insecure_seed": key.insecure_seed,
            "versions": versions(),
        }
    )
    return run


def new_run_id() -> str:
    """A server run's public identity: 128 random bits from the operating system, hex.  Sent
    with every request (``server-run``), so a client trains at most once per round of a
    server run.  Not drawn from the run key: a reproducible run (``insecure_seed``) repeated
    with the same clients is another server run, and its round 1 must not be taken for the
    first run's."""
    return secrets.token_hex(16)


def server_key(recipe: FederatedRecipe, run: RunDir) -> RunKey:
    """The server's own key (its client-level DP coins and noise), in its run directory."""
    return run_key(run.path, recipe.privacy.insecure_seed, create=True)


def client_guarantee(recipe: FederatedRecipe, pairs_per_step: int) -> dict[str, Any]:
    """What run.json states for every client: the record-level guarantee of this run's
    releases (per person for a client with its own privacy unit), a function of the recipe
    and of ``pairs_per_step`` (one noise pair per two trainable coordinates of a local step:
    the model's structure) only, never of which clients replied when.

    The server sends each client one request per round, ``R = federated.rounds``, and a client
    takes at most ``T`` local steps per request, each the policy's Poisson-subsampled Gaussian
    at its ``q_k``: this run's releases of client ``k`` compose at most ``R T`` of them,
    whatever failed, declined or timed out.  ``basis``:

    - ``calibrated`` (non-adaptive, no fixed noise multiplier): each client calibrates its
      noise for ``R T`` steps at its ``q_k`` to meet the recipe's ``(epsilon, delta_k)`` with
      the recipe's accountant (a client refuses another accountant), so this run is
      ``(epsilon, delta_k + eta)``-DP for each client, whatever ``N_k`` (one ``N_k`` for the
      run: a client declines a round calibrated for another ``N_k`` than its earlier rounds
      of the run, since steps of two calibrations compose to more); ``delta_k`` is
      ``privacy.delta``, or each client's ``1/(10 N_k)`` when it is unset (``delta`` null).
    - ``planned`` (fixed noise multiplier, ``training.sample_rate`` and ``privacy.delta``
      set): the accountant's epsilon of ``R T`` planned events at ``delta``.
    - ``client filters`` (adaptive policies; a fixed noise whose ``q_k`` or ``delta_k``
      follows ``N_k``): no bound is a function of the recipe alone (epsilon null); each
      client's own budget filter caps its lifetime spend at its own budget.

    One request per round per client holds when each client is one node with one state
    directory: a client trains at most once per (server run, round) of its state
    (:mod:`dptrain.federated.client`), so a redelivered request, or a second node on its
    partition-id sharing its state directory, is declined; two nodes on one partition-id
    with separate state directories holding the same records would train them twice per
    round, as two clients (the server drops the second update and records it privately:
    ``shared_partitions``; the simulation and the loopback deployment refuse such a set-up).

    ``eta = (1 + e^epsilon) pairs 2^-129`` is the noise sampler's truncation term
    (:func:`~dptrain.noise.truncation_delta`) for at most ``R T pairs_per_step`` pairs; null
    when ``T`` follows ``N_k`` (``training.epochs``).  Over its lifetime -- earlier and later
    server runs included -- each client's own filter caps its spend at its own budget (the
    data holder's settings, unknown to the server; in a simulation and on the loopback
    deployment, the recipe's ``privacy`` section).  The spends the clients report are private
    (:mod:`dptrain.federated.server`)."""
    policy = policy_from_recipe(recipe.policy)
    t, p, rounds = recipe.training, recipe.privacy, recipe.federated.rounds
    steps = rounds * t.steps if t.steps is not None else None  # R T, when T is the recipe's
    eps: float | None = None
    delta = p.delta
    if policy.adaptive:
        basis = "client filters"
        why = "an adaptive policy: the noise is chosen during training"
    elif policy.noise_multiplier is None:
        basis, eps = "calibrated", float(p.epsilon)
        why = "each client's noise calibrated for all of them at the recipe's (epsilon, delta)"
    elif t.sample_rate is not None and p.delta is not None and steps is not None:
        event = policy.planned_event(float(t.sample_rate))
        assert event is not None  # non-adaptive
        basis = "planned"
        eps = get_accountant(p.accountant).epsilon([event.with_steps(steps)], p.delta)
        why = "at the recipe's noise multiplier and sample rate"
    else:
        basis = "client filters"
        why = "the noise is fixed and each client's sample rate or delta follows its N_k"
    pairs = steps * pairs_per_step if steps is not None and eps is not None else None
    eta = truncation_delta(eps, pairs) if pairs is not None and eps is not None else None
    if eps is None:
        statement = (
            f"no bound from the recipe alone ({why}); each client's own budget filter caps "
            "its spend over its lifetime at its own (epsilon, delta), the data holder's "
            "settings (in a simulation: the recipe's privacy section, "
            "epsilon_budget_per_client); a client refuses a request for more"
        )
    else:
        shown = f"{delta:.3g}" if delta is not None else "1/(10 N_k) for its N_k records or people"
        trunc = f" + {eta:.3g}" if eta is not None else " + the noise sampler's truncation term"
        statement = (
            f"this run: ({eps:.4g}, {shown}{trunc}) for each record of each client (each "
            f"person, for a client with its own privacy unit), whatever it replied: at most "
            f"{rounds} requests of at most {t.steps or 'T'} local steps each (one per round: "
            f"each client trains once per round of this run), {why}; over its lifetime each "
            "client's own budget filter also caps its spend. It assumes each client's records "
            "are held by one node with one state directory"
        )
    return {
        "epsilon": eps,
        "delta": delta,
        "delta_noise_truncation": eta,
        "noise_pairs": pairs,  # at most
        "accountant": p.accountant,
        "basis": basis,
        "statement": statement,
    }


def _round_lines(report: RoundReport | None, strategy: LoraFedAvg, clients: int) -> list[str]:
    """A round's console lines.  Under client-level DP the guarantee shown is the
    client-level one; each client's own record-level epsilon is not (it is another unit's
    guarantee, and says in which rounds the client took part: private/stats.json keeps it)."""
    if report is None:
        return []
    client_dp = report.client_dp_epsilon is not None

    def spend(entry: dict[str, Any], sep: str) -> str:
        return "" if client_dp else f"epsilon {entry['epsilon']:.4f}{sep}"

    lines = []
    for cid in range(clients):
        name, entry = f"client {cid}", report.clients.get(cid)
        if entry is not None and entry["status"] == "trained":
            shown = spend(entry, " (") or "trained ("
            lines.append(f"  {name}: {shown}{entry['steps']} local steps)")
        elif entry is not None:
            why = entry["status"]  # declined, or failed after reporting its spend
            if why == "failed" and not client_dp:
                why = f"failed (charged as all {entry['steps']} planned local steps)"
            lines.append(f"  {name}: {spend(entry, ', ')}{why}: {entry['reason']}")
        elif name in report.failures:
            last = strategy.epsilon.get(cid)
            known = (
                f"epsilon at least {last:.4f} (its last report), "
                if last is not None and not client_dp
                else ""
            )
            lines.append(f"  {name}: {known}failed: {report.failures[name]}")
        else:
            lines.append(f"  {name}: not sampled")
    lines += [f"  {who}: failed: {why}" for who, why in report.failures.items() if "node" in who]
    if report.note:
        lines.append(f"  note: {report.note}")
    if client_dp:
        lines.append(
            f"  client-level DP: epsilon {report.client_dp_epsilon:.4f} at delta "
            f"{strategy.ledger_delta():.3g} (per client, all its records; per-client "
            "record-level epsilons not shown)"
        )
    return lines


def run_server(grid: Grid, recipe: FederatedRecipe, run: RunDir) -> dict[str, Any]:
    """The ServerApp's work: rounds of :class:`LoraFedAvg`, a global evaluation after each,
    checkpoints and the final adapter; returns the run's metadata."""
    f = recipe.federated
    run_id = run.read_meta().get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise RecipeError(
            f"{run.meta} has no run_id: the clients could not tell this server run's rounds "
            "from another's. Fix: start the run with dptrain.federated.server.start_run"
        )
    strategy = LoraFedAvg(recipe, server_key(recipe, run), run_id=run_id)
    with MODEL_LOCK:  # the global model, evaluated on the server's device
        model, tokenizer = build_model(recipe, strategy.device)
    initial = strategy.spec.init(lora_state(model), strategy.device)
    # the most noise pairs a client's local step draws: one per two trainable coordinates
    # (each client trains the same adapters of the same model)
    pairs = pairs_for(p for n, p in model.named_parameters() if strategy.spec.trainable(n))
    run.update_meta(client_guarantee=client_guarantee(recipe, pairs))  # before any round
    val = tokenize(validation_dataset(recipe), tokenizer, recipe.data.max_length)
    batches = eval_batches(val, recipe.training.physical_batch_size)
    history: dict[int, float] = {}
    t0 = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = dict(arrays.to_torch_state_dict())
        load_lora_state(model, state)
        ppl = history[server_round] = perplexity(model, batches)
        report = strategy.reports.get(server_round)
        if report is not None and strategy.client_dp is not None:
            strategy.ledger.save(run.ledger)  # the ledger first: it covers what is shown
        head = "before training" if server_round == 0 else f"round {server_round}/{f.rounds}"
        lines = [f"{head}: global validation perplexity {ppl:.3f}"]
        print("\n".join(lines + _round_lines(report, strategy, f.clients)), flush=True)
        if report is not None:
            run.log(
                {
                    "round": server_round,
                    "val_perplexity": ppl,
                    "clients": {str(k): v for k, v in report.clients.items()},
                    "failures": report.failures,
                    "updates": report.updates,
                    "aggregated": report.aggregated,
                    "note": report.note,
                    "client_dp_epsilon": report.client_dp_epsilon,
                    "seconds": time.perf_counter() - t0,
                }
            )
            run.save_checkpoint(server_round, {"round": server_round, "adapters": state})
        return MetricRecord({"perplexity": ppl})

    strategy.start(
        grid,
        ArrayRecord(initial),
        num_rounds=f.rounds,
        timeout=f.round_timeout,
        evaluate_fn=evaluate,
    )
    save_final(model, tokenizer, run.final)
    # which clients replied in which round (and so how far each ledger got) can follow the
    # private data, and under client-level DP a client's spend says in which rounds it took
    # part: the reported spends are private; run.json holds client_guarantee instead
    stats = run.update_stats(  # validation records are not covered by any guarantee
        perplexity_before=history.get(0, math.nan),
        perplexity_after=history.get(f.rounds, math.nan),
        perplexity_by_round=history,
        train_seconds=time.perf_counter() - t0,  # follows the clients' batch sizes: private
        client_epsilon={str(k): v for k, v in sorted(strategy.epsilon.items())},
        client_delta={str(k): v for k, v in sorted(strategy.delta.items())},
        # whose spend may exceed client_epsilon: their last request got no reply reporting it
        client_epsilon_unconfirmed=sorted(strategy.unconfirmed),
        # client -> rounds in which a second node answered for it (its update dropped)
        shared_partitions={str(k): v for k, v in sorted(strategy.shared_partitions.items())},
        # clients that trained with their own insecure-seed: no guarantee for their records
        insecure_clients=sorted(strategy.insecure_clients),
    )
    meta = run.update_meta(
        status="finished",
        client_dp_epsilon=strategy.ledger_epsilon(),
        client_dp_delta=strategy.ledger_delta(),
    )
    _print_summary(run, meta, stats)
    return meta


def _print_summary(run: RunDir, meta: dict[str, Any], stats: dict[str, Any]) -> None:
    """The run's summary: the guarantee run.json states for every client
    (:func:`client_guarantee`) and, under client-level DP, the client-level one.  The
    clients' reported spends are private (private/stats.json): without client-level DP the
    operator's console shows them, marked private; under it they are a different unit and say
    in which rounds a client took part, so they are named, not printed."""
    g = meta["client_guarantee"]
    lines = [
        "",
        f"run directory       {run.path}",
        f"strategy            {meta['strategy']}, {meta['clients']} clients, {meta['rounds']} rounds",
        f"val perplexity      {stats['perplexity_before']:.3f} -> {stats['perplexity_after']:.3f} "
        "(private: the validation records are not covered by the guarantee)",
        f"every client        {g['statement']} ({g['accountant']}; run.json client_guarantee)",
    ]
    if meta.get("client_dp_epsilon") is not None:
        lines += [
            f"client-level DP     (epsilon, delta) = ({meta['client_dp_epsilon']:.4f}, "
            f"{meta['client_dp_delta']:.3g}) over all rounds ({meta['accountant']}): for each "
            "client with all its records, whether it took part or not (reported, not enforced)",
            "record-level        each client's own (epsilon, delta) for its records is not the "
            "client-level guarantee and is not shown: it says in which rounds the client took "
            "part (private/stats.json)",
        ]
    else:
        eps = ", ".join(
            f"client {k}: ({v:.4f}, {stats['client_delta'].get(k, float('nan')):.3g})"
            for k, v in stats["client_epsilon"].items()
        )
        lines.append(
            f"privacy per client  (epsilon, delta) reported over all rounds ({meta['accountant']}): "
            f"{eps or 'none'} (private: which clients replied when can follow their data)"
        )
        if stats.get("client_epsilon_unconfirmed"):
            lines.append(
                f"                    may have spent more (their last request got no reply "
                f"with their spend): {', '.join(stats['client_epsilon_unconfirmed'])}"
            )
    if stats.get("shared_partitions"):
        lines.append(
            "warning: two nodes answered for one partition-id in a round (private/stats.json "
            "shared_partitions; the second reply was not aggregated): the client_guarantee "
            "assumes one node with one state-dir per client. Fix: give each SuperNode its own "
            "partition-id"
        )
    lines += [
        f"final adapter       {run.final}",
        # no report/privacy.png: a server run has no record-level ledger to plot; its
        # ledger.json (client-level DP events) exists only with federated.client_dp
        f"publishable         {', '.join(_public_files(run))}; "
        "everything else is private "
        f"(secret.key, private/, checkpoints/: {run.readme})",
    ]
    if stats.get("insecure_clients"):
        lines.append(
            "warning: client(s) "
            + ", ".join(str(c) for c in stats["insecure_clients"])
            + " replied that their coins and noise follow from an insecure-seed in their own "
            "settings: NO privacy guarantee for their records against anyone who knows that "
            "seed; the client_guarantee above does not hold for them"
        )
    if meta.get("insecure_seed") is not None:
        lines.append(
            f"warning: privacy.insecure_seed={meta['insecure_seed']}: NO privacy guarantee "
            "against anyone who knows that seed (server and simulated clients)"
        )
    print("\n".join(lines), flush=True)


def make_server_app(recipe: FederatedRecipe, run: RunDir) -> ServerApp:
    """A Flower ``ServerApp`` running :func:`run_server` for ``recipe`` into ``run``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, recipe, run)

    return app


def _public_files(run: RunDir) -> list[str]:
    """The public files a server run has: no record-level figure, ledger.json only when it
    was written (client-level DP)."""
    return [
        f
        for f in PUBLIC_FILES
        if f != "report/privacy.png" and (f != "ledger.json" or run.ledger.exists())
    ]

"""The federated server: a Flower ``ServerApp`` that runs :class:`LoraFedAvg` for a recipe and
writes a run directory like ``dptrain train``'s.

Run directory (``README.txt`` in it says what may be published, see :mod:`dptrain.rundir`)::

    secret.key         PRIVATE. The server's run key (0600): client-level DP coins and noise;
                       marked used when the run starts, never reused by another run
    recipe.yaml        the recipe
    run.json           strategy, clients, rounds, each client's last reported epsilon and
                       who may have spent more (client_epsilon_unconfirmed: the last request
                       got no reply with a spend); without client-level DP -- with it, in
                       private/stats.json: a client's spend says in which rounds it took part
    private/metrics.jsonl  PRIVATE. One line per round: global validation perplexity, each
                       client's status (trained / declined + reason / failed + reason), epsilon
    private/stats.json     PRIVATE. The validation perplexity before, after and by round,
                       the training time (and, with client-level DP, each client's epsilon)
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
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..data import tokenize
from ..data.lm import eval_batches
from ..losses import perplexity
from ..models import build_model
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


def server_key(recipe: FederatedRecipe, run: RunDir) -> RunKey:
    """The server's own key (its client-level DP coins and noise), in its run directory."""
    return run_key(run.path, recipe.privacy.insecure_seed, create=True)


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
    strategy = LoraFedAvg(recipe, server_key(recipe, run))
    with MODEL_LOCK:  # the global model, evaluated on the server's device
        model, tokenizer = build_model(recipe, strategy.device)
    initial = strategy.spec.init(lora_state(model), strategy.device)
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
    per_client = {
        "client_epsilon": {str(k): v for k, v in sorted(strategy.epsilon.items())},
        "client_delta": {str(k): v for k, v in sorted(strategy.delta.items())},
        # whose spend may exceed client_epsilon: their last request got no reply reporting it
        "client_epsilon_unconfirmed": sorted(strategy.unconfirmed),
    }
    # client-level DP protects whether a client took part: each client's own spend says in
    # which rounds it trained (and that it exists), so it stays with the server's private files
    private = per_client if f.client_dp is not None else {}
    stats = run.update_stats(  # validation records are not covered by any guarantee
        perplexity_before=history.get(0, math.nan),
        perplexity_after=history.get(f.rounds, math.nan),
        perplexity_by_round=history,
        train_seconds=time.perf_counter() - t0,  # follows the clients' batch sizes: private
        **private,
    )
    meta = run.update_meta(
        status="finished",
        **({} if private else per_client),
        client_dp_epsilon=strategy.ledger_epsilon(),
        client_dp_delta=strategy.ledger_delta(),
    )
    _print_summary(run, meta, stats)
    return meta


def _print_summary(run: RunDir, meta: dict[str, Any], stats: dict[str, Any]) -> None:
    """The run's summary.  Under client-level DP the guarantee is the client-level one
    (each client with all its records); the clients' own record-level spends are a
    different unit and private (they say in which rounds a client took part), so they are
    named, not printed."""
    lines = [
        "",
        f"run directory       {run.path}",
        f"strategy            {meta['strategy']}, {meta['clients']} clients, {meta['rounds']} rounds",
        f"val perplexity      {stats['perplexity_before']:.3f} -> {stats['perplexity_after']:.3f} "
        "(private: the validation records are not covered by the guarantee)",
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
            f"client {k}: ({v:.4f}, {meta['client_delta'].get(k, float('nan')):.3g})"
            for k, v in meta["client_epsilon"].items()
        )
        lines.append(
            f"privacy per client  (epsilon, delta) over all rounds ({meta['accountant']}): "
            f"{eps or 'none'}"
        )
        if meta.get("client_epsilon_unconfirmed"):
            lines.append(
                f"                    may have spent more (their last request got no reply "
                f"with their spend): {', '.join(meta['client_epsilon_unconfirmed'])}"
            )
    lines += [
        f"final adapter       {run.final}",
        f"publishable         {', '.join(PUBLIC_FILES)}; everything else is private "
        f"(secret.key, private/, checkpoints/: {run.readme})",
    ]
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

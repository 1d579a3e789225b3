"""``dptrain federated RECIPE``: federated LoRA fine-tuning with Flower.

dptrain federated recipes/federated.yaml                  # in-process Flower simulation
dptrain federated recipes/federated.yaml --deploy         # SuperLink + SuperNodes on 127.0.0.1
dptrain federated recipes/federated.yaml --app-dir app/   # a Flower App for `flwr run`
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import add_overrides, quiet_library_bars


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federated",
        help="federated DP fine-tuning of LoRA adapters with Flower (FedSVD, FFA-LoRA, DP-LoRA)",
        description="Run a federated recipe: N clients with a non-IID split of the data, R "
        "rounds; each client trains with sample-level DP and keeps its own ledger. Prints the "
        "global validation perplexity and each client's epsilon per round and writes a run "
        "directory.",
    )
    p.add_argument("recipe", help="path to a federated YAML recipe (see recipes/federated.yaml)")
    p.add_argument("--output", metavar="RUN_DIR", help="run directory (default: runs/<name>)")
    add_overrides(p, "federated.rounds=2")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--deploy",
        action="store_true",
        help="run as separate Flower processes (a SuperLink and one SuperNode per client) on "
        "127.0.0.1 instead of an in-process simulation",
    )
    mode.add_argument(
        "--app-dir",
        metavar="DIR",
        help="only write a Flower App directory for `flwr run` on your own SuperLink",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..extras import require
    from ..recipe import load_recipe

    require("flwr", "federated", "dptrain federated")

    recipe = load_recipe(args.recipe, args.set, command="federated")
    if not args.verbose:
        quiet_library_bars()  # a "loading weights" bar per client and round
        logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's convergence notes
    if args.app_dir:
        from ..federated.deploy import write_app

        app = write_app(recipe, args.app_dir, recipe.run_dir(args.output))
        f = recipe.federated
        print(
            f"Flower App written to {app}. Start a SuperLink and {f.clients} SuperNodes, e.g.\n"
            "  flower-superlink --insecure --disable-runtime-dependency-installation\n"
            "  flower-supernode --insecure --superlink SERVER:8000 --port 9094 \\\n"
            f"    --node-config \"partition-id=K num-partitions={f.clients} state-dir='DIR' "
            f'epsilon={recipe.privacy.epsilon:g}"\n'
            "  (each data holder sets its own state-dir, epsilon, delta, accountant, "
            "min-noise-multiplier)\n"
            f"then: flwr run {app} CONNECTION --stream   (CONNECTION in $FLWR_HOME/config.toml)"
        )
        return 0
    if args.deploy:
        from ..federated.deploy import deploy

        _, done = deploy(recipe, args.output, stream=True)
        if done.returncode != 0:
            print(f"error: flwr run exited with {done.returncode}", file=sys.stderr)
            return 1
        return 0
    from ..federated import simulate

    simulate(recipe, args.output, verbose=args.verbose)
    return 0
